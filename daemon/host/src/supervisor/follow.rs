//! Waking the followers of workers' output when there is something for them, and only then:
//! one thread per host watches the output directories of followed workers with one inotify
//! instance (the shim's appends show there, with no channel between shim and daemon), and marks
//! exactly the followers of a worker whose files changed, or that ended. An idle follower costs
//! no CPU at all: no timer, no read; a line written reaches its followers in well under a
//! millisecond.
//!
//! Safety nets: every 2 s the followers of every ended worker are woken again (a follow ends
//! even if the word of the end was missed); an overflowed event queue wakes everyone; a worker
//! whose directories cannot be watched (no inotify, `fs.inotify.max_user_watches` reached) has
//! its followers woken every 100 ms, as polling did.
//!
//! What a worker's output directory holds (see `berth_sys::output`): `stdout/` and `stderr/`,
//! made by the shim at the first byte, each a directory of segment files. So the thread watches
//! the worker's directory (for those two being made) and each of them (for segments written
//! and made); and while some followed worker has no directory yet (it is still PENDING), the
//! directory of all workers, for it being made.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use berth_sys::notify::{self, Doorbell, Event, Inotify, WatchId};
use berth_sys::output::StreamKind;

use super::Inner;

/// How often the followers of ended workers are woken again, in case a wake was missed.
const SWEEP: Duration = Duration::from_secs(2);

/// How often the followers of a worker that cannot be watched are woken.
pub(super) const POLL: Duration = Duration::from_millis(100);

const DIR_EVENTS: u32 = notify::CREATE | notify::MOVED_TO | notify::DELETE_SELF | notify::ONLYDIR;
const STREAM_EVENTS: u32 = notify::MODIFY | notify::CREATE | notify::MOVED_TO | notify::ONLYDIR;
const ROOT_EVENTS: u32 = notify::CREATE | notify::MOVED_TO | notify::ONLYDIR;

/// What wakes one follower, and for which of its workers (by their index in its list).
#[derive(Debug)]
pub(super) struct Wake {
    notify: Notify,
    news: Mutex<BTreeSet<usize>>,
}

impl Wake {
    fn new() -> Self {
        Self {
            notify: Notify::new(),
            news: Mutex::new(BTreeSet::new()),
        }
    }

    fn news(&self) -> MutexGuard<'_, BTreeSet<usize>> {
        self.news.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, worker: usize) {
        self.news().insert(worker);
        self.notify.notify_one();
    }

    /// Waits until there is news; at once if some came since the last wait.
    pub(super) async fn notified(&self) {
        self.notify.notified().await
    }

    /// The workers with news since the last call.
    pub(super) fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.news()).into_iter().collect()
    }
}

enum Command {
    /// Follower `id` follows `workers` too (each with its index in the follower's list).
    Follow {
        id: u64,
        workers: Vec<(usize, String)>,
        wake: Arc<Wake>,
        done: oneshot::Sender<()>,
    },
    Unfollow {
        id: u64,
    },
    /// Follower `id` is done with `worker` (it ended and all of its output was read).
    Release {
        id: u64,
        worker: String,
    },
    /// A worker's state changed (it ended): its followers look again.
    Changed {
        worker: String,
    },
}

/// The host's one watcher of output directories (a thread, see the module).
#[derive(Debug)]
pub(super) struct OutputWatch {
    commands: mpsc::Sender<Command>,
    bell: Arc<Doorbell>,
    next_id: AtomicU64,
}

/// One follower's registration; its followers are forgotten when it is dropped.
#[derive(Debug)]
pub(super) struct Following {
    pub(super) wake: Arc<Wake>,
    /// The watcher did not take the registration (it is gone): the follower polls itself.
    pub(super) unwatched: bool,
    id: u64,
    commands: mpsc::Sender<Command>,
    bell: Arc<Doorbell>,
}

/// Sends `c` to the watcher thread and rings its bell; false when the thread is gone.
fn tell(commands: &mpsc::Sender<Command>, bell: &Doorbell, c: Command) -> bool {
    let sent = commands.send(c).is_ok();
    if sent {
        bell.ring();
    }
    sent
}

impl Following {
    /// Follows `workers` too, whose indices in this follower's list start at `first`; the
    /// receiver says when the watcher has them (an error: it is gone, and the follower polls).
    pub(super) fn add(&self, first: usize, workers: Vec<String>) -> oneshot::Receiver<()> {
        let (done, registered) = oneshot::channel();
        let follow = Command::Follow {
            id: self.id,
            workers: (first..).zip(workers).collect(),
            wake: self.wake.clone(),
            done,
        };
        tell(&self.commands, &self.bell, follow);
        registered
    }

    /// Done with `worker`: its watches go unless another follower has it (a session's follower
    /// holds only its live workers).
    pub(super) fn release(&self, worker: &str) {
        let release = Command::Release {
            id: self.id,
            worker: worker.to_owned(),
        };
        tell(&self.commands, &self.bell, release);
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        tell(
            &self.commands,
            &self.bell,
            Command::Unfollow { id: self.id },
        );
    }
}

impl OutputWatch {
    /// Starts the watcher of the worker directories under `root` (`<state>/workers`); `ended`
    /// says whether a worker has ended (or is unknown).
    pub(super) fn start(
        root: PathBuf,
        ended: impl Fn(&str) -> bool + Send + 'static,
    ) -> io::Result<Self> {
        let bell = Arc::new(Doorbell::new()?);
        let inotify = match Inotify::new() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no inotify instance: output followers poll every {} ms",
                    POLL.as_millis()
                );
                None
            }
        };
        let (tx, rx) = mpsc::channel();
        let actor = Watcher {
            root,
            inotify,
            commands: rx,
            bell: bell.clone(),
            ended: Box::new(ended),
            workers: HashMap::new(),
            watches: HashMap::new(),
            root_watch: None,
            missing: HashSet::new(),
            polled: HashSet::new(),
            followers: HashMap::new(),
            warned: false,
        };
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("berth-output".into())
            .spawn(move || {
                let _g = span.enter();
                actor.run()
            })?;
        Ok(Self {
            commands: tx,
            bell,
            next_id: AtomicU64::new(1),
        })
    }

    /// Registers a follower of `workers`; once this returns, every change to their output
    /// (and their end) marks it.
    #[cfg(test)]
    pub(super) async fn follow(&self, workers: Vec<String>) -> Following {
        self.begin(workers).registered().await
    }

    /// Starts the registration of a follower of `workers`, which [`Registering::registered`]
    /// waits for: a follower reads what is there meanwhile, and again once registered.
    pub(super) fn begin(&self, workers: Vec<String>) -> Registering {
        let wake = Arc::new(Wake::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, registered) = oneshot::channel();
        let follow = Command::Follow {
            id,
            workers: workers.into_iter().enumerate().collect(),
            wake: wake.clone(),
            done,
        };
        let sent = tell(&self.commands, &self.bell, follow);
        Registering {
            registered: sent.then_some(registered),
            following: Following {
                wake,
                unwatched: false,
                id,
                commands: self.commands.clone(),
                bell: self.bell.clone(),
            },
        }
    }
}

/// A follower's registration on its way to the watcher thread.
pub(super) struct Registering {
    registered: Option<oneshot::Receiver<()>>,
    following: Following,
}

impl Registering {
    /// The registration, once the watcher has it: from then on every change marks it.
    pub(super) async fn registered(self) -> Following {
        let Registering {
            registered,
            mut following,
        } = self;
        following.unwatched = match registered {
            Some(r) => r.await.is_err(),
            None => true,
        };
        following
    }
}

impl OutputWatch {
    /// Worker `id` changed state (ended): its followers look again.
    pub(super) fn changed(&self, worker: &str) {
        let changed = Command::Changed {
            worker: worker.to_owned(),
        };
        tell(&self.commands, &self.bell, changed);
    }
}

impl Drop for OutputWatch {
    fn drop(&mut self) {
        // The thread ends once every sender is gone; wake it to see that.
        self.bell.ring();
    }
}

impl Inner {
    /// The host's output watcher, started by the first follower; `None` when it cannot start
    /// (its followers then poll).
    pub(super) fn output_watch(self: &Arc<Self>) -> Option<&OutputWatch> {
        self.output_watch
            .get_or_init(|| {
                let host = Arc::downgrade(self);
                let ended = move |id: &str| {
                    host.upgrade()
                        .is_none_or(|i| i.status(id).is_none_or(|s| s.is_terminal()))
                };
                OutputWatch::start(self.opts.state_dir.join("workers"), ended)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "cannot start the output watcher; followers poll")
                    })
                    .ok()
            })
            .as_ref()
    }

    /// Worker `id` ended: its followers look again (and end once they have read all).
    pub(super) fn wake_followers(&self, id: &str) {
        if let Some(Some(w)) = self.output_watch.get() {
            w.changed(id);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A worker's directory.
    Dir,
    /// A worker's `stdout/` or `stderr/`.
    Stream,
}

#[derive(Default)]
struct Watched {
    watches: Vec<WatchId>,
    /// (follower, its wake, the worker's index in its list)
    followers: Vec<(u64, Arc<Wake>, usize)>,
}

/// The thread's state: the followed workers, their watches and followers.
struct Watcher {
    root: PathBuf,
    inotify: Option<Inotify>,
    commands: mpsc::Receiver<Command>,
    bell: Arc<Doorbell>,
    ended: Box<dyn Fn(&str) -> bool + Send>,
    workers: HashMap<String, Watched>,
    watches: HashMap<WatchId, (String, Target)>,
    /// The watch of `root`, while some followed worker has no directory yet.
    root_watch: Option<WatchId>,
    /// Followed workers whose directory does not exist yet.
    missing: HashSet<String>,
    /// Followed workers that could not be watched: their followers are woken every POLL.
    polled: HashSet<String>,
    followers: HashMap<u64, Vec<String>>,
    warned: bool,
}

impl Watcher {
    fn run(mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_sweep = Instant::now() + SWEEP;
        loop {
            let now = Instant::now();
            let timeout = if self.polled.is_empty() {
                next_sweep.saturating_duration_since(now)
            } else {
                POLL.min(next_sweep.saturating_duration_since(now))
            };
            let ready = {
                let mut fds = vec![self.bell.as_fd()];
                if let Some(n) = &self.inotify {
                    fds.push(n.as_fd());
                }
                notify::wait_readable(&fds, timeout)
            };
            if ready[0] {
                self.bell.clear();
            }
            loop {
                match self.commands.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if ready.get(1).copied().unwrap_or(false) {
                let events = match &self.inotify {
                    Some(n) => n.read_events(&mut buf),
                    None => Ok(Vec::new()),
                };
                match events {
                    Ok(ev) => self.on_events(ev),
                    Err(e) => {
                        tracing::warn!(error = %e, "read inotify events; waking every follower");
                        self.wake_all();
                    }
                }
            }
            if !self.polled.is_empty() {
                let polled: Vec<String> = self.polled.iter().cloned().collect();
                for w in &polled {
                    self.wake(w);
                }
            }
            if Instant::now() >= next_sweep {
                self.sweep();
                next_sweep = Instant::now() + SWEEP;
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Follow {
                id,
                workers,
                wake,
                done,
            } => {
                let names = self.followers.entry(id).or_default();
                names.extend(workers.iter().map(|(_, w)| w.clone()));
                for (i, w) in workers {
                    let fresh = !self.workers.contains_key(&w);
                    self.workers.entry(w.clone()).or_default().followers.push((
                        id,
                        wake.clone(),
                        i,
                    ));
                    if fresh {
                        self.watch_worker(&w);
                    }
                }
                let _ = done.send(());
            }
            Command::Unfollow { id } => {
                for w in self.followers.remove(&id).unwrap_or_default() {
                    let Some(e) = self.workers.get_mut(&w) else {
                        continue;
                    };
                    e.followers.retain(|f| f.0 != id);
                    if e.followers.is_empty() {
                        self.forget(&w);
                    }
                }
            }
            Command::Release { id, worker } => {
                if let Some(names) = self.followers.get_mut(&id) {
                    names.retain(|n| *n != worker);
                }
                if let Some(e) = self.workers.get_mut(&worker) {
                    e.followers.retain(|f| f.0 != id);
                    if e.followers.is_empty() {
                        self.forget(&worker);
                    }
                }
            }
            Command::Changed { worker } => self.wake(&worker),
        }
    }

    /// Stops watching worker `w`, which nobody follows any more.
    fn forget(&mut self, w: &str) {
        if let Some(e) = self.workers.remove(w) {
            for wd in e.watches {
                self.watches.remove(&wd);
                if let Some(n) = &self.inotify {
                    let _ = n.remove_watch(wd);
                }
            }
        }
        self.missing.remove(w);
        self.polled.remove(w);
    }

    /// Adds a watch of `path` (an error without inotify).
    fn add(&self, path: &std::path::Path, mask: u32) -> io::Result<WatchId> {
        match &self.inotify {
            Some(n) => n.add_watch(path, mask),
            None => Err(io::Error::new(io::ErrorKind::Unsupported, "no inotify")),
        }
    }

    /// Watches worker `w`'s directory and its stream directories (those that exist: the
    /// making of the others shows in the worker's directory).
    fn watch_worker(&mut self, w: &str) {
        let dir = self.root.join(w);
        for attempt in 0..2 {
            match self.add(&dir, DIR_EVENTS) {
                Ok(wd) => {
                    self.missing.remove(w);
                    self.polled.remove(w);
                    self.record(wd, w, Target::Dir);
                    for s in StreamKind::BOTH {
                        self.watch_stream(w, s.dir_name());
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Not made yet (the worker is PENDING): watch the directory of all workers
                    // for it.
                    if self.root_watch.is_none() {
                        match self.add(&self.root, ROOT_EVENTS) {
                            Ok(wd) => self.root_watch = Some(wd),
                            Err(e) => return self.cannot_watch(w, &e),
                        }
                    }
                    self.missing.insert(w.to_owned());
                    // Made between the two calls, unseen by the root watch: once more.
                    if attempt == 0 && dir.exists() {
                        continue;
                    }
                    return;
                }
                Err(e) => return self.cannot_watch(w, &e),
            }
        }
    }

    fn watch_stream(&mut self, w: &str, name: &str) {
        match self.add(&self.root.join(w).join(name), STREAM_EVENTS) {
            Ok(wd) => self.record(wd, w, Target::Stream),
            // Made at the first byte; the worker's directory watch sees that.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => self.cannot_watch(w, &e),
        }
    }

    fn record(&mut self, wd: WatchId, w: &str, target: Target) {
        self.watches.insert(wd, (w.to_owned(), target));
        if let Some(e) = self.workers.get_mut(w) {
            if !e.watches.contains(&wd) {
                e.watches.push(wd);
            }
        }
    }

    fn cannot_watch(&mut self, w: &str, e: &io::Error) {
        // Without inotify at all, that was said once at the start.
        if !self.warned && self.inotify.is_some() {
            self.warned = true;
            tracing::warn!(
                worker = %w,
                error = %e,
                "cannot watch a worker's output (fs.inotify.max_user_watches?): its followers \
                 poll every {} ms",
                POLL.as_millis()
            );
        }
        self.polled.insert(w.to_owned());
    }

    fn on_events(&mut self, events: Vec<Event>) {
        // Each worker's followers are woken once per batch, however many writes it holds.
        let mut news: HashSet<String> = HashSet::new();
        for ev in events {
            if ev.mask & notify::Q_OVERFLOW != 0 {
                tracing::debug!("inotify queue overflowed; waking every follower");
                self.wake_all();
                continue;
            }
            if Some(ev.watch) == self.root_watch {
                if ev.mask & notify::IGNORED != 0 {
                    self.root_watch = None;
                    continue;
                }
                let name = ev.name.as_ref().and_then(|n| n.to_str()).unwrap_or("");
                if self.missing.contains(name) {
                    let w = name.to_owned();
                    self.watch_worker(&w);
                    news.insert(w);
                }
                continue;
            }
            let Some((w, target)) = self.watches.get(&ev.watch).cloned() else {
                // A watch removed a moment ago.
                continue;
            };
            if ev.mask & notify::IGNORED != 0 {
                // Its directory is gone (the worker was forgotten, its files removed).
                self.watches.remove(&ev.watch);
                if let Some(e) = self.workers.get_mut(&w) {
                    e.watches.retain(|x| *x != ev.watch);
                }
                news.insert(w);
                continue;
            }
            match target {
                Target::Stream => {
                    news.insert(w);
                }
                Target::Dir => {
                    let made = ev.mask & (notify::CREATE | notify::MOVED_TO) != 0;
                    let stream = StreamKind::BOTH
                        .into_iter()
                        .map(StreamKind::dir_name)
                        .find(|s| ev.is_named(s));
                    if let (true, Some(s)) = (made, stream) {
                        self.watch_stream(&w, s);
                        news.insert(w);
                    } else if ev.mask & notify::DELETE_SELF != 0 {
                        news.insert(w);
                    }
                }
            }
        }
        for w in news {
            crate::phase!("output_seen", w);
            self.wake(&w);
        }
    }

    /// The slow safety net: followers of ended workers look again; workers that could not be
    /// watched are tried again; the root watch goes once no followed worker lacks a directory.
    fn sweep(&mut self) {
        let ended: Vec<String> = self
            .workers
            .keys()
            .filter(|w| (self.ended)(w))
            .cloned()
            .collect();
        for w in &ended {
            self.wake(w);
        }
        if self.inotify.is_some() {
            let retry: Vec<String> = self
                .polled
                .iter()
                .chain(self.missing.iter())
                .cloned()
                .collect();
            for w in retry {
                self.polled.remove(&w);
                self.watch_worker(&w);
                self.wake(&w);
            }
        }
        if self.missing.is_empty() {
            if let (Some(wd), Some(n)) = (self.root_watch.take(), &self.inotify) {
                let _ = n.remove_watch(wd);
            }
        }
    }

    fn wake(&self, w: &str) {
        if let Some(e) = self.workers.get(w) {
            for (_, wake, i) in &e.followers {
                wake.mark(*i);
            }
        }
    }

    fn wake_all(&self) {
        for e in self.workers.values() {
            for (_, wake, i) in &e.followers {
                wake.mark(*i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(root: &std::path::Path, ended: Arc<Mutex<HashSet<String>>>) -> OutputWatch {
        OutputWatch::start(root.to_path_buf(), move |w| {
            ended.lock().unwrap().contains(w)
        })
        .unwrap()
    }

    /// The workers with news for `f` within `within`; a wake whose news an earlier `take`
    /// already collected (one write is several events: create, then modify) is not news.
    async fn woken(f: &Following, within: Duration) -> Option<Vec<usize>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            tokio::time::timeout_at(deadline, f.wake.notified())
                .await
                .ok()?;
            let news = f.wake.take();
            if !news.is_empty() {
                return Some(news);
            }
        }
    }

    #[tokio::test]
    async fn a_write_wakes_the_followers_of_that_worker_only() {
        let root = tempfile::tempdir().unwrap();
        for w in ["w1", "w2"] {
            std::fs::create_dir_all(root.path().join(w).join("stdout")).unwrap();
        }
        let ow = watch(root.path(), Default::default());
        let a = ow.follow(vec!["w1".into(), "w2".into()]).await;
        let b = ow.follow(vec!["w2".into()]).await;
        assert!(!a.unwatched);
        let t = Instant::now();
        std::fs::write(
            root.path().join("w1/stdout/00000000000000000000.log"),
            "x\n",
        )
        .unwrap();
        assert_eq!(woken(&a, Duration::from_secs(5)).await, Some(vec![0]));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(woken(&b, Duration::from_millis(200)).await, None);
        // The rest of that write's events (its create and its modify can come apart) mark w1
        // only.
        assert!(a.wake.take().iter().all(|&i| i == 0));
        // The stream directory made after the follow began (the shim makes it at the first
        // byte) is watched from then on.
        std::fs::create_dir_all(root.path().join("w2/stderr")).unwrap();
        assert_eq!(woken(&b, Duration::from_secs(5)).await, Some(vec![0]));
        assert_eq!(woken(&a, Duration::from_secs(5)).await, Some(vec![1]));
        std::fs::write(root.path().join("w2/stderr/00000000000000000000.log"), "y").unwrap();
        assert_eq!(woken(&b, Duration::from_secs(5)).await, Some(vec![0]));
        assert_eq!(woken(&a, Duration::from_secs(5)).await, Some(vec![1]));
    }

    #[tokio::test]
    async fn a_worker_without_a_directory_yet_is_watched_once_it_has_one() {
        let root = tempfile::tempdir().unwrap();
        let ow = watch(root.path(), Default::default());
        let f = ow.follow(vec!["late".into()]).await;
        assert_eq!(woken(&f, Duration::from_millis(100)).await, None);
        std::fs::create_dir_all(root.path().join("late")).unwrap();
        assert_eq!(woken(&f, Duration::from_secs(5)).await, Some(vec![0]));
        std::fs::create_dir_all(root.path().join("late/stdout")).unwrap();
        assert_eq!(woken(&f, Duration::from_secs(5)).await, Some(vec![0]));
        std::fs::write(
            root.path().join("late/stdout/00000000000000000000.log"),
            "z",
        )
        .unwrap();
        assert_eq!(woken(&f, Duration::from_secs(5)).await, Some(vec![0]));
    }

    #[tokio::test]
    async fn an_end_wakes_followers_by_word_or_by_the_sweep() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("w1")).unwrap();
        let ended: Arc<Mutex<HashSet<String>>> = Default::default();
        let ow = watch(root.path(), ended.clone());
        let f = ow.follow(vec!["w1".into()]).await;
        ow.changed("w1");
        assert_eq!(woken(&f, Duration::from_secs(5)).await, Some(vec![0]));
        // No word of the end: the sweep finds it.
        ended.lock().unwrap().insert("w1".into());
        assert_eq!(
            woken(&f, SWEEP + Duration::from_secs(3)).await,
            Some(vec![0])
        );
    }

    #[tokio::test]
    async fn a_released_worker_wakes_its_follower_no_more() {
        let root = tempfile::tempdir().unwrap();
        for w in ["w1", "w2"] {
            std::fs::create_dir_all(root.path().join(w).join("stdout")).unwrap();
        }
        let ow = watch(root.path(), Default::default());
        let f = ow.follow(vec!["w1".into(), "w2".into()]).await;
        f.release("w1");
        // The release reaches the watcher before the follow below, which waits for it.
        let g = ow.follow(vec!["w2".into()]).await;
        std::fs::write(root.path().join("w1/stdout/00000000000000000000.log"), "1").unwrap();
        assert_eq!(woken(&f, Duration::from_millis(300)).await, None);
        std::fs::write(root.path().join("w2/stdout/00000000000000000000.log"), "2").unwrap();
        assert_eq!(woken(&f, Duration::from_secs(5)).await, Some(vec![1]));
        assert_eq!(woken(&g, Duration::from_secs(5)).await, Some(vec![0]));
    }

    #[tokio::test]
    async fn watches_go_with_the_last_follower() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("w1/stdout")).unwrap();
        let ow = watch(root.path(), Default::default());
        let a = ow.follow(vec!["w1".into()]).await;
        let b = ow.follow(vec!["w1".into()]).await;
        drop(a);
        std::fs::write(root.path().join("w1/stdout/00000000000000000000.log"), "1").unwrap();
        assert_eq!(woken(&b, Duration::from_secs(5)).await, Some(vec![0]));
        drop(b);
        // A new follower after the last one went starts from fresh watches.
        let c = ow.follow(vec!["w1".into()]).await;
        std::fs::write(root.path().join("w1/stdout/00000000000000000000.log"), "2").unwrap();
        assert_eq!(woken(&c, Duration::from_secs(5)).await, Some(vec![0]));
    }
}
