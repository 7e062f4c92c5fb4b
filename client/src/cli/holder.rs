//! The session holder: what `berth session open --hold-while PID` leaves running for a caller
//! that cannot hold a lease itself. R is single-threaded: while it blocks (in an `accept`, in a
//! long computation) nothing of it could renew a lease or print its workers' output.
//!
//! The holder is a process of its own (the same binary, verb `session hold`), detached from its
//! caller: a process group of its own (a Ctrl-C meant for the caller does not reach it), its
//! working directory `/`, standard streams on /dev/null and no descriptor of the caller's, so
//! that a caller reading `session open`'s output to its end (R's `system2(stdout = TRUE)`)
//! does not wait for the holder. It
//! - renews the session's lease every third of it while PID lives;
//! - closes the session as soon as PID is gone, so that a `kill -9` of the caller ends its
//!   workers at once (if the holder itself is killed, the lease lapses and the server ends them);
//! - copies the output of every worker of the session, those launched after it started too, to
//!   `--output` (standard error lines to `--output-stderr` where given), line by line as
//!   `[<worker id>] <line>`;
//! - exits once the session has ended.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::args::HoldArgs;
use super::lease::{self, Signal, Signals};
use super::output::{OutputDemux, Sink};
use super::{CliError, Server};
use crate::{pb, Client, TlsFiles};

/// How often the holder looks whether its process still lives: how soon after a `kill -9` of
/// the caller its workers are told to stop.
const LIVENESS_EVERY: Duration = Duration::from_millis(200);
/// How long a broken watch or output stream (a server restarting) waits before it is opened
/// again, and a failed close is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// After the session has ended by itself (closed by its caller, or its lease lapsed) while its
/// caller lives: how long the last output of its stopping workers may take to arrive. The
/// server's stop grace is 10 s.
const DRAIN_ENDED: Duration = Duration::from_secs(12);
/// After the caller is gone: how long the holder still copies the output of the stopping
/// workers (whoever read the caller's output may read on: `Rscript … | tee`).
const DRAIN_GONE: Duration = Duration::from_secs(3);
/// Chunks on their way to the writer thread; a slow reader of the output holds the streams
/// back (never the renewals).
const CHANNEL: usize = 256;

/// What `/proc/PID/stat` tells of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, …; `Z` for a zombie.
    pub state: char,
    /// Clock ticks after boot: with the pid, what tells a process from a later one that got the
    /// same pid.
    pub start_time: u64,
}

impl ProcStat {
    /// Whether this is the process that started at `start_time` and has not ended (a zombie
    /// has: it only waits for its parent to reap it).
    pub fn is_alive_since(self, start_time: u64) -> bool {
        self.start_time == start_time && !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/PID/stat`: `pid (comm) state ppid … starttime …`. The command name may hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `starttime` is field 22 of the line, the 19th after `state` (field 3).
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

async fn stat_of(pid: u32) -> Option<ProcStat> {
    let text = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    parse_stat(&text)
}

/// The start time of process `pid`, which must be alive.
pub async fn start_time_of(pid: u32) -> Result<u64, CliError> {
    match stat_of(pid).await {
        Some(s) if s.is_alive_since(s.start_time) => Ok(s.start_time),
        _ => Err(CliError::NoProcess { pid }),
    }
}

/// Opens an output destination for appending (creating a file that does not exist): writes of
/// the holder then never overwrite what others write to the same file.
pub async fn open_destination(path: &Path) -> Result<File, CliError> {
    let opened = tokio::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .await;
    match opened {
        Ok(f) => Ok(f.into_std().await),
        Err(source) => Err(CliError::Destination {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What `session open` hands to the holder it starts.
#[derive(Debug, Clone)]
pub struct HolderSpec {
    /// The server, with the TLS material the holder presents: its paths absolute, since the
    /// holder runs in `/` (see [`absolute`]).
    pub server: Server,
    pub session: String,
    pub ttl_seconds: u32,
    pub pid: u32,
    pub start_time: u64,
    pub output: Option<PathBuf>,
    pub output_stderr: Option<PathBuf>,
}

impl HolderSpec {
    /// The holder's command line, after the program name. The TLS files go as flags; the
    /// holder's environment has no `BERTH_TLS_*` (see [`spawn`]), so it presents exactly these.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--addr".into(),
            self.server.addr.clone().into(),
            "session".into(),
            "hold".into(),
            self.session.clone().into(),
            "--ttl".into(),
            self.ttl_seconds.to_string().into(),
            "--hold-while".into(),
            self.pid.to_string().into(),
            "--start-time".into(),
            self.start_time.to_string().into(),
        ];
        let TlsFiles { ca, cert, key } = &self.server.tls;
        let paths = [
            ("--tls-ca", ca),
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--output", &self.output),
            ("--output-stderr", &self.output_stderr),
        ];
        for (flag, path) in paths {
            if let Some(p) = path {
                a.push(flag.into());
                a.push(p.clone().into());
            }
        }
        a
    }
}

/// Starts the holder, detached (see the module doc); returns its pid. The holder is not waited
/// for: it outlives this command and is reparented when this command exits.
pub async fn spawn(spec: &HolderSpec) -> Result<u32, CliError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(CliError::Holder)?;
    let mut cmd = Command::new(exe);
    cmd.args(spec.args())
        .env_remove(crate::tls::ENV_CA)
        .env_remove(crate::tls::ENV_CERT)
        .env_remove(crate::tls::ENV_KEY)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // fork and exec: a blocking call, kept off the runtime's thread.
    let child = tokio::task::spawn_blocking(move || cmd.spawn())
        .await
        .map_err(|e| CliError::Holder(std::io::Error::other(e)))?
        .map_err(CliError::Holder)?;
    Ok(child.id())
}

/// `server` with its TLS paths made absolute (against the current directory), for the holder,
/// which runs in `/`.
pub fn absolute(server: &Server) -> Result<Server, CliError> {
    let abs = |p: &Option<PathBuf>| -> Result<Option<PathBuf>, CliError> {
        p.as_deref()
            .map(|p| {
                std::path::absolute(p).map_err(|e| {
                    CliError::Holder(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", p.display()),
                    ))
                })
            })
            .transpose()
    };
    let t = &server.tls;
    Ok(Server {
        addr: server.addr.clone(),
        tls: TlsFiles {
            ca: abs(&t.ca)?,
            cert: abs(&t.cert)?,
            key: abs(&t.key)?,
        },
    })
}

/// Closes every descriptor above standard error that the holder inherited from its caller
/// (through `session open`): a listening socket of R's, or the pipe of a `system2`, would stay
/// open as long as the holder lives. Called first thing in the holder, while it has one thread
/// and has opened nothing of its own.
pub fn close_inherited_fds() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        // The listing's own descriptor was listed too, and is closed by now.
        if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
            continue;
        }
        // SAFETY: `fd` is open (listed just now and still there) and nothing in this process
        // owns it: the process has only just started, on one thread, and has opened nothing
        // but the listing, which is closed. Owning it here is only to close it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Why the holder stops holding.
#[derive(Debug)]
enum End {
    /// The server no longer knows the session: closed by its caller, or its lease lapsed.
    Ended,
    /// The held process is gone.
    Gone,
    /// SIGTERM or SIGINT: close the session, as when the process is gone.
    Signal,
}

/// Runs the holder: `berth session hold`. Returns once the session has ended.
pub async fn hold(server: &Server, a: &HoldArgs) -> Result<(), CliError> {
    let out = match &a.output {
        Some(p) => Some(open_destination(p).await?),
        None => None,
    };
    let err = match &a.output_stderr {
        Some(p) => Some(open_destination(p).await?),
        None => None,
    };
    let mut signals = Signals::catch().map_err(CliError::Holder)?;
    let (tx, written) = start_writer(Destinations::new(out, err)).map_err(CliError::Holder)?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let follower = tokio::spawn(follow_session(
        server.clone(),
        a.id.clone(),
        tx.clone(),
        drain_rx,
    ));
    let ttl = Duration::from_secs(u64::from(a.ttl));
    let end = tokio::select! {
        _ = lease::renew(server, &a.id, lease::renew_every(ttl)) => End::Ended,
        () = gone(a.hold_while, a.start_time) => End::Gone,
        _ = terminating(&mut signals) => End::Signal,
    };
    let drain = match end {
        End::Ended => DRAIN_ENDED,
        End::Gone | End::Signal => {
            close(server, &a.id, ttl).await;
            DRAIN_GONE
        }
    };
    let _ = drain_tx.send(true);
    let _ = tokio::time::timeout(drain, follower).await;
    // The writer may be stuck on a reader that reads no more: the process exits regardless.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tx.send(Item::Finish).await;
        let _ = written.await;
    })
    .await;
    Ok(())
}

/// Returns once process `pid` (started at `start_time`) has ended.
async fn gone(pid: u32, start_time: u64) {
    loop {
        match stat_of(pid).await {
            Some(s) if s.is_alive_since(start_time) => {}
            _ => return,
        }
        tokio::time::sleep(LIVENESS_EVERY).await;
    }
}

/// The next SIGTERM or SIGINT; SIGHUP (the caller's terminal went away) is no reason to stop.
async fn terminating(signals: &mut Signals) -> Signal {
    loop {
        let s = signals.recv().await;
        if s != Signal::Hangup {
            return s;
        }
    }
}

/// Closes session `id`; a failure other than NOT_FOUND is tried again for as long as the lease
/// would hold it anyway.
async fn close(server: &Server, id: &str, ttl: Duration) {
    let deadline = tokio::time::Instant::now() + ttl;
    loop {
        if let Ok(c) = server.connect().await {
            let r = c
                .workers()
                .close_session(pb::CloseSessionRequest {
                    session_id: id.to_owned(),
                    grace_seconds: None,
                })
                .await;
            match r {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::NotFound => return,
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() + RETRY_AFTER > deadline {
            return;
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// What goes to the writer thread.
#[derive(Debug)]
enum Item {
    Chunk(pb::OutputChunk),
    /// A worker's output has ended: its unfinished last lines go out.
    Ended(String),
    /// Write what is held back, and stop.
    Finish,
}

/// Follows the session: a watch of its workers, and for each new one a task that copies its
/// output, until told to drain; then waits for those tasks (they end with their workers).
async fn follow_session(
    server: Server,
    id: String,
    out: mpsc::Sender<Item>,
    mut drain: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut seen = HashSet::new();
    loop {
        let watched = tokio::select! {
            r = watch_session(&server, &id, &out, &mut seen, &mut tasks) => r,
            _ = drain.wait_for(|d| *d) => break,
        };
        if matches!(&watched, Err(s) if s.code() == tonic::Code::NotFound) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_AFTER) => {}
            _ = drain.wait_for(|d| *d) => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// One `WatchWorkers` of the session (current workers first), starting a follower for every
/// worker not seen before. Returns when the stream ends or fails.
async fn watch_session(
    server: &Server,
    id: &str,
    out: &mpsc::Sender<Item>,
    seen: &mut HashSet<String>,
    tasks: &mut JoinSet<()>,
) -> Result<(), tonic::Status> {
    let client = server
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut events = client
        .workers()
        .watch_workers(pb::WatchWorkersRequest {
            session_id: id.to_owned(),
            initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        let Some(w) = event.worker else { continue };
        if seen.insert(w.id.clone()) {
            tasks.spawn(follow_worker(
                client.clone(),
                server.clone(),
                w.id,
                out.clone(),
            ));
        }
    }
    Ok(())
}

/// Copies the output of worker `id` from its start until it has ended, opening the stream again
/// after a failure without repeating what was copied.
async fn follow_worker(client: Client, server: Server, id: String, out: mpsc::Sender<Item>) {
    let mut next = Offsets::default();
    let mut client = Some(client);
    loop {
        let c = match client.take() {
            Some(c) => c,
            None => match server.connect().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            },
        };
        match copy_output(&c, &id, &mut next, &out).await {
            Ok(()) => break,
            Err(s) if s.code() == tonic::Code::NotFound => break,
            Err(_) => tokio::time::sleep(RETRY_AFTER).await,
        }
    }
    let _ = out.send(Item::Ended(id)).await;
}

async fn copy_output(
    c: &Client,
    id: &str,
    next: &mut Offsets,
    out: &mpsc::Sender<Item>,
) -> Result<(), tonic::Status> {
    let mut stream = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![id.to_owned()],
            follow: true,
            from_start: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        if let Some(chunk) = next.unseen(chunk) {
            if out.send(Item::Chunk(chunk)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The next byte of each stream of one worker that was not copied yet. A stream opened again
/// replays from the start; what was copied before is dropped by its offsets.
#[derive(Debug, Default)]
struct Offsets {
    stdout: u64,
    stderr: u64,
}

impl Offsets {
    /// What of `chunk` was not copied yet, if anything.
    fn unseen(&mut self, mut chunk: pb::OutputChunk) -> Option<pb::OutputChunk> {
        let next = match chunk.stream() {
            pb::Stream::Stderr => &mut self.stderr,
            pb::Stream::Stdout | pb::Stream::Unspecified => &mut self.stdout,
        };
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= *next {
            return None;
        }
        if chunk.offset < *next {
            // `end > next > offset`: the skipped part is shorter than the data.
            let skip = usize::try_from(*next - chunk.offset).unwrap_or(usize::MAX);
            chunk.data.drain(..skip);
            chunk.offset = *next;
        }
        *next = end;
        Some(chunk)
    }
}

/// Where the copied lines go. A destination whose write fails (its reader went away) is given
/// up; the other one, and the session, carry on.
#[derive(Debug)]
struct Destinations {
    out: Option<File>,
    err: Option<File>,
    /// Standard error lines have a destination of their own.
    separate: bool,
}

impl Destinations {
    fn new(out: Option<File>, err: Option<File>) -> Self {
        let separate = err.is_some();
        Self { out, err, separate }
    }

    /// Writes `bytes`, whole lines, one write per line: a line is never split by what others
    /// write to the same pipe or terminal.
    fn write(&mut self, sink: Sink, bytes: &[u8]) {
        let dest = match sink {
            Sink::Stderr if self.separate => &mut self.err,
            _ => &mut self.out,
        };
        let Some(file) = dest.as_mut() else { return };
        let failed = bytes
            .split_inclusive(|b| *b == b'\n')
            .any(|line| file.write_all(line).is_err());
        if failed {
            *dest = None;
        }
    }
}

/// A thread that writes the lines: a write can block on a reader that does not read (a full
/// pipe), and must block nothing else.
fn start_writer(
    mut dest: Destinations,
) -> std::io::Result<(mpsc::Sender<Item>, oneshot::Receiver<()>)> {
    let (tx, mut rx) = mpsc::channel(CHANNEL);
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("berth-output".into())
        .spawn(move || {
            let mut demux = OutputDemux::new(true);
            while let Some(item) = rx.blocking_recv() {
                match item {
                    Item::Chunk(c) => {
                        let (sink, bytes) = demux.push(&c);
                        dest.write(sink, &bytes);
                    }
                    Item::Ended(id) => {
                        for (sink, bytes) in demux.finish_worker(&id) {
                            dest.write(sink, &bytes);
                        }
                    }
                    Item::Finish => break,
                }
            }
            for (sink, bytes) in demux.finish() {
                dest.write(sink, &bytes);
            }
            let _ = done_tx.send(());
        })?;
    Ok((tx, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let line = |comm: &str, state: &str, start: &str| {
            format!(
                "4242 ({comm}) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 \
                 {start} 10000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
            )
        };
        let cases: &[(String, Option<ProcStat>)] = &[
            (
                line("R", "S", "123456"),
                Some(ProcStat {
                    state: 'S',
                    start_time: 123456,
                }),
            ),
            // A command name with spaces and parentheses.
            (
                line("my (odd) prog", "R", "7"),
                Some(ProcStat {
                    state: 'R',
                    start_time: 7,
                }),
            ),
            (
                line("R", "Z", "9"),
                Some(ProcStat {
                    state: 'Z',
                    start_time: 9,
                }),
            ),
            ("4242 (R) S 1 2 3".to_owned(), None),
            (String::new(), None),
            (line("R", "S", "x"), None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_stat(text), *want, "{text}");
        }
        // This very process, as the kernel tells it.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_stat(&me).unwrap();
        assert!(s.is_alive_since(s.start_time));
        assert!(!s.is_alive_since(s.start_time + 1), "another process");
        let zombie = ProcStat {
            state: 'Z',
            start_time: 1,
        };
        assert!(!zombie.is_alive_since(1));
    }

    fn chunk(stream: pb::Stream, offset: u64, data: &[u8]) -> pb::OutputChunk {
        pb::OutputChunk {
            worker_id: "w".into(),
            stream: stream as i32,
            data: data.to_vec(),
            offset,
        }
    }

    #[test]
    fn a_replayed_stream_repeats_nothing() {
        let mut next = Offsets::default();
        let out = pb::Stream::Stdout;
        let got = next.unseen(chunk(out, 0, b"abc")).unwrap();
        assert_eq!(got.data, b"abc");
        // Opened again: the start again, partly seen.
        assert!(next.unseen(chunk(out, 0, b"ab")).is_none());
        let got = next.unseen(chunk(out, 0, b"abcde")).unwrap();
        assert_eq!((got.offset, &got.data[..]), (3, &b"de"[..]));
        // The other stream counts on its own.
        let got = next.unseen(chunk(pb::Stream::Stderr, 0, b"x")).unwrap();
        assert_eq!(got.data, b"x");
        // A gap (output the server could not keep) is passed over.
        let got = next.unseen(chunk(out, 10, b"z")).unwrap();
        assert_eq!((got.offset, &got.data[..]), (10, &b"z"[..]));
        assert!(next.unseen(chunk(out, 11, b"")).is_none());
    }

    #[test]
    fn holder_command_line_parses() {
        use crate::cli::args::{Cli, Command, SessionCommand};
        use clap::Parser;
        let mut spec = HolderSpec {
            server: Server {
                addr: "unix:/tmp/x.sock".into(),
                tls: TlsFiles::default(),
            },
            session: "s1".into(),
            ttl_seconds: 10,
            pid: 77,
            start_time: 123,
            output: Some("/proc/77/fd/1".into()),
            output_stderr: None,
        };
        let parse = |spec: &HolderSpec| {
            Cli::try_parse_from(std::iter::once("berth".into()).chain(spec.args())).unwrap()
        };
        let cli = parse(&spec);
        assert_eq!(cli.server(), spec.server);
        let Command::Session(SessionCommand::Hold(h)) = cli.command else {
            panic!("not hold")
        };
        assert_eq!((h.id.as_str(), h.ttl, h.hold_while), ("s1", 10, 77));
        assert_eq!(h.start_time, 123);
        assert_eq!(h.output.as_deref(), Some(Path::new("/proc/77/fd/1")));
        assert_eq!(h.output_stderr, None);

        // The holder presents the TLS material of `session open`, by flags.
        spec.server = Server {
            addr: "node1:7300".into(),
            tls: TlsFiles {
                ca: Some("/etc/berth/ca.pem".into()),
                cert: Some("/home/alice/alice.pem".into()),
                key: Some("/home/alice/alice.key".into()),
            },
        };
        spec.output_stderr = Some("/proc/77/fd/2".into());
        let cli = parse(&spec);
        assert_eq!(cli.server(), spec.server);
        let Command::Session(SessionCommand::Hold(h)) = cli.command else {
            panic!("not hold")
        };
        assert_eq!(h.output_stderr.as_deref(), Some(Path::new("/proc/77/fd/2")));
    }

    #[test]
    fn the_holder_gets_absolute_tls_paths() {
        let cwd = std::env::current_dir().unwrap();
        let server = Server {
            addr: "node1:7300".into(),
            tls: TlsFiles {
                ca: Some("certs/ca.pem".into()),
                cert: Some("/abs/alice.pem".into()),
                key: None,
            },
        };
        let abs = absolute(&server).unwrap();
        assert_eq!(abs.addr, "node1:7300");
        assert_eq!(abs.tls.ca, Some(cwd.join("certs/ca.pem")));
        assert_eq!(abs.tls.cert.as_deref(), Some(Path::new("/abs/alice.pem")));
        assert_eq!(abs.tls.key, None);
    }

    #[test]
    fn destinations_split_streams_or_share_one() {
        let dir = std::env::temp_dir().join(format!("berth-holder-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join(name))
                .unwrap()
        };
        let mut one = Destinations::new(Some(open("one")), None);
        one.write(Sink::Stdout, b"[a] x\n");
        one.write(Sink::Stderr, b"[a] y\n[a] z\n");
        let mut two = Destinations::new(Some(open("out")), Some(open("err")));
        two.write(Sink::Stdout, b"[a] x\n");
        two.write(Sink::Stderr, b"[a] y\n");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("one"), "[a] x\n[a] y\n[a] z\n");
        assert_eq!(
            (read("out"), read("err")),
            ("[a] x\n".into(), "[a] y\n".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
