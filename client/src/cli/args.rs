//! The command line of `berth`: verbs, flags and the parsers of their values. Clap turns a
//! malformed command line into a usage error (exit status 2) before any call is made.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use super::Server;
use crate::{pb, TlsFiles, DEFAULT_ADDR};

/// Launch, track and stop berth workers on a host daemon or a scheduler.
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// Server address: HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:PATH; a
    /// comma-separated list (scheduler replicas) is tried in turn.
    #[arg(long, global = true, env = "BERTH_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// PEM file of the CA that signs the server's certificate. With any --tls-* a HOST:PORT
    /// address is reached over TLS (unix:PATH and http:// never are).
    #[arg(long, global = true, env = "BERTH_TLS_CA", value_name = "PEM", value_parser = path())]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this client's certificate (with --tls-key): who calls, to a server beyond
    /// loopback (on the Unix socket and on loopback the server knows the caller from the kernel).
    #[arg(long, global = true, env = "BERTH_TLS_CERT", value_name = "PEM", value_parser = path())]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, global = true, env = "BERTH_TLS_KEY", value_name = "PEM", value_parser = path())]
    pub tls_key: Option<PathBuf>,
    /// Print one JSON document (the response) instead of tables, and a failure as one on
    /// stderr (client/JSON.md); `logs` stays raw.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Whether this is the session holder that `session open --hold-while` starts.
    pub fn is_holder(&self) -> bool {
        matches!(self.command, Command::Session(SessionCommand::Hold(_)))
    }

    /// The server, and the TLS material that every connection to it presents.
    pub fn server(&self) -> Server {
        Server {
            addr: self.addr.clone(),
            tls: TlsFiles {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            }
            .normalized(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Launch N workers, all or none (prints them; --wait or --attach to follow them).
    Launch(Box<LaunchArgs>),
    /// List workers.
    #[command(visible_alias = "ps")]
    List(ListArgs),
    /// Wait until workers have ended (or run, with --running); exit 1 if any failed.
    Await(AwaitArgs),
    /// Stop workers: SIGTERM, then SIGKILL after the grace period.
    Stop(StopArgs),
    /// Print the output of workers, raw (-f to follow it until they end).
    Logs(LogsArgs),
    /// Show what the host daemon has and holds.
    Info,
    /// List the hosts behind a scheduler; `hosts remove NAME` forgets one gone for good.
    Hosts(HostsArgs),
    /// Stop placing new workers on a host of a scheduler (its workers keep running).
    Drain(HostArg),
    /// Place new workers on a drained host again.
    Undrain(HostArg),
    /// Open, renew or close a session (its workers end with it).
    #[command(subcommand)]
    Session(SessionCommand),
}

/// `berth session …`: sessions for callers that hold no connection of their own (scripts, R).
#[derive(Debug, Clone, Subcommand)]
pub enum SessionCommand {
    /// Open a session; print it (its id without --json).
    ///
    /// With --hold-while, a detached holder process keeps it alive while PID lives, closes it
    /// once PID is gone, and copies the output of its workers to --output.
    Open(SessionOpenArgs),
    /// Renew a session's lease; print the session.
    #[command(visible_alias = "keep-alive")]
    Keepalive(SessionIdArg),
    /// Close a session: its workers are stopped. Prints them.
    Close(SessionCloseArgs),
    /// The holder that `open --hold-while` starts (not for people: run by `open`).
    #[command(hide = true)]
    Hold(HoldArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SessionOpenArgs {
    /// Lease in seconds: without renewal the session ends this long after the last one (a
    /// holder renews it every third of it).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = super::lease::DEFAULT_TTL_SECS,
        value_parser = clap::value_parser!(u32).range(1..=86400)
    )]
    pub ttl: u32,
    /// Keep the session alive while process PID lives, and close it as soon as PID is gone.
    #[arg(long, value_name = "PID")]
    pub hold_while: Option<u32>,
    /// Where the holder writes the workers' output, line by line as `[id] line` (opened for
    /// appending; e.g. /proc/<PID>/fd/1, the caller's own standard output, or a file).
    #[arg(long, value_name = "PATH", requires = "hold_while")]
    pub output: Option<PathBuf>,
    /// Where the workers' standard error lines go instead of --output.
    #[arg(long, value_name = "PATH", requires = "output")]
    pub output_stderr: Option<PathBuf>,
    /// Free label of the session (repeatable).
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, Args)]
pub struct SessionIdArg {
    /// Session id, as `session open` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct SessionCloseArgs {
    /// Session id, as `session open` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Seconds between SIGTERM and SIGKILL for its workers (server default 10).
    #[arg(long, value_name = "SECS")]
    pub grace: Option<u32>,
}

/// What `session open --hold-while` hands to the holder it starts.
#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    #[arg(value_name = "ID")]
    pub id: String,
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..=86400))]
    pub ttl: u32,
    #[arg(long, value_name = "PID")]
    pub hold_while: u32,
    /// Start time of PID (clock ticks after boot, /proc/PID/stat), so that another process
    /// that gets the same pid later is not taken for it.
    #[arg(long, value_name = "TICKS")]
    pub start_time: u64,
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "output")]
    pub output_stderr: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub action: Option<HostsCommand>,
}

/// `berth hosts …`.
#[derive(Debug, Clone, Subcommand)]
pub enum HostsCommand {
    /// Forget a DOWN host that is gone for good (its workers are LOST); root or an admin.
    Remove(HostArg),
    /// As `berth drain`.
    Drain(HostArg),
    /// As `berth undrain`.
    Undrain(HostArg),
}

#[derive(Debug, Clone, Args)]
pub struct HostArg {
    /// Host name, as `berth hosts` lists it.
    pub name: String,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("program").args(["script", "code", "command"]).multiple(false)))]
pub struct LaunchArgs {
    /// Number of workers.
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 1)]
    pub n: u32,
    /// CPU cores per worker (a hard cap).
    #[arg(long, value_name = "C", default_value_t = 1.0)]
    pub cpu: f64,
    /// GiB of memory per worker (a hard limit).
    #[arg(long, value_name = "GB", default_value_t = 1.0)]
    pub memory: f64,
    /// Whole GPUs per worker.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub gpus: u32,
    /// Interpreter of --script or --code (server default: python3).
    #[arg(long, value_name = "K")]
    pub kernel: Option<String>,
    /// Source file to run with the kernel, relative to --workdir.
    #[arg(long, value_name = "FILE")]
    pub script: Option<String>,
    /// Source code to run with the kernel.
    #[arg(long, value_name = "SRC")]
    pub code: Option<String>,
    /// Extra environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Session the workers belong to (they end with it). With --attach, berth keeps it alive
    /// while attached and leaves it open when it exits.
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Working directory of the workers on their host; default: the current directory
    /// ("" leaves it to the server).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// What the workers see as BERTH_MASTER_IP.
    #[arg(long, value_name = "IP")]
    pub master_ip: Option<String>,
    /// Network of each worker.
    #[arg(long, value_enum, default_value_t = Network::Bridge)]
    pub network: Network,
    /// Free label returned with the workers (repeatable).
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Host label the workers' host must carry (repeatable; scheduler placement).
    #[arg(long = "constraint", value_name = "K=V", value_parser = parse_key_value)]
    pub constraints: Vec<(String, String)>,
    /// How a scheduler spreads the workers over hosts.
    #[arg(long, value_enum, default_value_t = PlacementArg::Binpack)]
    pub placement: PlacementArg,
    /// Restart policy.
    #[arg(long, value_enum, default_value_t = Restart::Never)]
    pub restart: Restart,
    /// Restarts allowed per worker with --restart on-failure.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_restarts: u32,
    /// Wait until the workers have ended; print them; exit 1 if any failed.
    #[arg(long, conflicts_with = "attach")]
    pub wait: bool,
    /// Stream the workers' output until they have ended; exit 1 if any failed. Without
    /// --session the workers get a session of their own that lives as long as this command:
    /// Ctrl-C or SIGTERM closes it and stops them (exit status 130 or 143), and if berth is
    /// killed, its lease lapses and they stop within --session-ttl plus the stop grace.
    #[arg(long)]
    pub attach: bool,
    /// Ask for workers that run as root instead of as you (only root or an admin may, where
    /// the host allows root workers; else PERMISSION_DENIED).
    #[arg(long)]
    pub run_as_root: bool,
    /// Id of this launch: a retry with the same ID (within 10 minutes) returns the workers of
    /// the first launch instead of launching again.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Lease, in seconds, of the session that --attach opens (renewed every third of it).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = super::lease::DEFAULT_TTL_SECS,
        value_parser = clap::value_parser!(u32).range(1..=86400),
        requires = "attach",
        conflicts_with = "session"
    )]
    pub session_ttl: u32,
    /// Program and arguments to run instead of a kernel.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `NetworkMode` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Network {
    /// Own namespace and IP address on the host's worker bridge.
    Bridge,
    /// The host's network namespace.
    Host,
    /// Own namespace with loopback only.
    None,
}

impl From<Network> for pb::NetworkMode {
    fn from(n: Network) -> Self {
        match n {
            Network::Bridge => pb::NetworkMode::Bridge,
            Network::Host => pb::NetworkMode::Host,
            Network::None => pb::NetworkMode::None,
        }
    }
}

/// `Placement` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    /// Fill the fullest host that fits first.
    Binpack,
    /// Prefer the emptiest hosts.
    Spread,
}

impl From<PlacementArg> for pb::Placement {
    fn from(p: PlacementArg) -> Self {
        match p {
            PlacementArg::Binpack => pb::Placement::Binpack,
            PlacementArg::Spread => pb::Placement::Spread,
        }
    }
}

/// `RestartPolicy.Mode` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    Never,
    OnFailure,
}

/// `WorkerStatus` on the command line (`--status running,failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "lower")]
pub enum StatusArg {
    Pending,
    Starting,
    Running,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl From<StatusArg> for pb::WorkerStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Pending => pb::WorkerStatus::Pending,
            StatusArg::Starting => pb::WorkerStatus::Starting,
            StatusArg::Running => pb::WorkerStatus::Running,
            StatusArg::Succeeded => pb::WorkerStatus::Succeeded,
            StatusArg::Failed => pb::WorkerStatus::Failed,
            StatusArg::Stopped => pb::WorkerStatus::Stopped,
            StatusArg::Lost => pb::WorkerStatus::Lost,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only these workers.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Only the workers of this session.
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Only workers in these states (comma-separated or repeated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        ignore_case = true,
        value_name = "STATUS"
    )]
    pub status: Vec<StatusArg>,
}

#[derive(Debug, Clone, Args)]
pub struct AwaitArgs {
    /// Workers to wait for; none means those of --session, or every worker.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// The workers of this session.
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Wait until the workers run (then they have their IP) instead of until they end.
    #[arg(long)]
    pub running: bool,
    /// Give up after SECS seconds (server default 60; 0: never).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("selector").args(["ids", "session", "all"]).required(true).multiple(false)))]
pub struct StopArgs {
    /// Workers to stop.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Stop every worker of this session.
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Stop every worker of the server.
    #[arg(long)]
    pub all: bool,
    /// Seconds between SIGTERM and SIGKILL (server default 10).
    #[arg(long, value_name = "SECS")]
    pub grace: Option<u32>,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("selector").args(["ids", "session"]).required(true).multiple(false)))]
pub struct LogsArgs {
    /// Workers whose output to print.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// The output of every worker of this session.
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Keep printing until every selected worker has ended.
    #[arg(short, long)]
    pub follow: bool,
    /// Only standard output.
    #[arg(long, conflicts_with = "stderr")]
    pub stdout: bool,
    /// Only standard error.
    #[arg(long)]
    pub stderr: bool,
    /// Start at the current end instead of replaying what was written before.
    #[arg(long)]
    pub tail: bool,
    /// With --session: follow the session, the workers it launches from now on too, until it
    /// has ended (implies --follow).
    #[arg(long, conflicts_with = "ids")]
    pub new_workers: bool,
}

/// A path that may be empty: an empty `--tls-*` (or `BERTH_TLS_*`) is unset, as if not given.
fn path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

/// Why a `K=V` argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    #[error("expected KEY=VALUE, got {0:?} (no '=')")]
    MissingEquals(String),
    #[error("expected KEY=VALUE, got {0:?} (empty key)")]
    EmptyKey(String),
}

/// Parses `KEY=VALUE`, splitting at the first `=`: the value may hold `=` and may be empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), KeyValueError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| KeyValueError::MissingEquals(s.to_owned()))?;
    if k.is_empty() {
        return Err(KeyValueError::EmptyKey(s.to_owned()));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    #[test]
    fn key_value() {
        type Case = (
            &'static str,
            Result<(&'static str, &'static str), KeyValueError>,
        );
        let cases: &[Case] = &[
            ("A=b", Ok(("A", "b"))),
            ("A=", Ok(("A", ""))),
            ("A=b=c", Ok(("A", "b=c"))),
            ("A= b c ", Ok(("A", " b c "))),
            ("A", Err(KeyValueError::MissingEquals("A".into()))),
            ("", Err(KeyValueError::MissingEquals(String::new()))),
            ("=b", Err(KeyValueError::EmptyKey("=b".into()))),
        ];
        for (input, want) in cases {
            let got = parse_key_value(input);
            let want = want.clone().map(|(k, v)| (k.to_owned(), v.to_owned()));
            assert_eq!(got, want, "{input:?}");
        }
        assert_eq!(
            KeyValueError::MissingEquals("FOO".into()).to_string(),
            "expected KEY=VALUE, got \"FOO\" (no '=')"
        );
    }

    #[test]
    fn launch_defaults_and_command() {
        let cli = parse(&["launch", "--", "/bin/echo", "-n", "--cpu"]).unwrap();
        let Command::Launch(a) = cli.command else {
            panic!("not launch")
        };
        assert_eq!((a.n, a.cpu, a.memory, a.gpus), (1, 1.0, 1.0, 0));
        assert_eq!(a.command, ["/bin/echo", "-n", "--cpu"]);
        assert_eq!(a.network, Network::Bridge);
        assert_eq!(a.restart, Restart::Never);
        assert!(!cli.json);
    }

    #[test]
    fn launch_flags() {
        let cli = parse(&[
            "--json",
            "launch",
            "-n",
            "3",
            "--cpu",
            "0.5",
            "--memory",
            "0.25",
            "--gpus",
            "1",
            "--code",
            "print(1)",
            "--env",
            "A=1",
            "-e",
            "B=x=y",
            "--label",
            "team=ml",
            "--constraint",
            "zone=a",
            "--network",
            "none",
            "--restart",
            "on-failure",
            "--max-restarts",
            "4",
            "--wait",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Launch(a) = cli.command else {
            panic!("not launch")
        };
        assert_eq!((a.n, a.cpu, a.memory, a.gpus), (3, 0.5, 0.25, 1));
        assert_eq!(a.code.as_deref(), Some("print(1)"));
        assert_eq!(
            a.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(a.network, Network::None);
        assert_eq!((a.restart, a.max_restarts), (Restart::OnFailure, 4));
        assert!(a.wait && !a.attach);
    }

    #[test]
    fn usage_errors() {
        let cases: &[&[&str]] = &[
            &["launch", "--env", "NOEQUALS"],
            &["launch", "--label", "=v"],
            &["launch", "--script", "a.py", "--code", "1"],
            &["launch", "--code", "1", "--", "/bin/true"],
            &["launch", "--wait", "--attach", "--", "/bin/true"],
            &["launch", "--session-ttl", "5", "--", "/bin/true"],
            &[
                "launch",
                "--attach",
                "--session-ttl",
                "0",
                "--",
                "/bin/true",
            ],
            &["launch", "--attach", "--session", "s", "--session-ttl", "5"],
            &["launch", "--network", "overlay"],
            &["launch", "-n", "-1"],
            &["stop"],
            &["stop", "--grace", "3"],
            &["stop", "abc", "--all"],
            &["stop", "--session", "s", "--all"],
            &["logs"],
            &["logs", "abc", "--stdout", "--stderr"],
            &["logs", "-f", "abc", "--new-workers"],
            &["list", "--status", "sleeping"],
            &["frobnicate"],
        ];
        for args in cases {
            let e = parse(args).expect_err(&format!("{args:?} parsed"));
            assert_ne!(e.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
    }

    #[test]
    fn attach_holds_a_session_of_its_own_unless_given_one() {
        let launch = |args: &[&str]| {
            let Command::Launch(a) = parse(args).unwrap().command else {
                panic!("not launch")
            };
            a
        };
        let a = launch(&["launch", "--attach", "--", "/bin/true"]);
        assert!(a.attach && a.session.is_none());
        assert_eq!(a.session_ttl, super::super::lease::DEFAULT_TTL_SECS);
        let a = launch(&[
            "launch",
            "--attach",
            "--session-ttl",
            "3",
            "--",
            "/bin/true",
        ]);
        assert_eq!(a.session_ttl, 3);
        let a = launch(&["launch", "--attach", "--session", "s1", "--", "/bin/true"]);
        assert_eq!(a.session.as_deref(), Some("s1"));
    }

    #[test]
    fn selectors_and_aliases() {
        let cli = parse(&["ps", "--status", "RUNNING,failed", "--status", "lost"]).unwrap();
        let Command::List(l) = cli.command else {
            panic!("ps is not list")
        };
        assert_eq!(
            l.status,
            [StatusArg::Running, StatusArg::Failed, StatusArg::Lost]
        );
        let Command::Stop(s) = parse(&["stop", "--all", "--grace", "0"]).unwrap().command else {
            panic!("not stop")
        };
        assert!(s.all && s.ids.is_empty());
        assert_eq!(s.grace, Some(0));
        let Command::Logs(g) = parse(&["logs", "-f", "--stderr", "a", "b"])
            .unwrap()
            .command
        else {
            panic!("not logs")
        };
        assert_eq!(g.ids, ["a", "b"]);
        assert!(g.follow && g.stderr && !g.stdout && !g.tail);
        let Command::Await(w) = parse(&["await", "--running", "--timeout", "0"])
            .unwrap()
            .command
        else {
            panic!("not await")
        };
        assert!(w.running && w.ids.is_empty());
        assert_eq!(w.timeout, Some(0));
    }

    #[test]
    fn addr_flag_after_verb() {
        let cli = parse(&["info", "--addr", "unix:/tmp/x.sock"]).unwrap();
        assert_eq!(cli.addr, "unix:/tmp/x.sock");
        // The last of repeated flags wins (an alias with --addr can be overridden).
        let cli = parse(&["--addr", "a:1", "list", "--addr", "b:2"]).unwrap();
        assert_eq!(cli.addr, "b:2");
    }

    #[test]
    fn tls_flags() {
        let cli = parse(&[
            "--tls-ca",
            "/etc/berth/ca.pem",
            "list",
            "--tls-cert",
            "alice.pem",
            "--tls-key",
            "alice.key",
        ])
        .unwrap();
        let s = cli.server();
        assert_eq!(s.addr, cli.addr);
        assert_eq!(
            s.tls,
            TlsFiles {
                ca: Some("/etc/berth/ca.pem".into()),
                cert: Some("alice.pem".into()),
                key: Some("alice.key".into()),
            }
        );
        // An empty value is unset.
        let cli = parse(&["--tls-ca=", "list"]).unwrap();
        assert!(cli.server().tls.is_empty(), "{:?}", cli.server());
    }

    #[test]
    fn hosts_lists_and_hosts_remove_names_a_host() {
        let Command::Hosts(a) = parse(&["hosts"]).unwrap().command else {
            panic!("not hosts")
        };
        assert!(a.action.is_none());
        let Command::Hosts(HostsArgs {
            action: Some(HostsCommand::Remove(h)),
        }) = parse(&["hosts", "remove", "gpu-7"]).unwrap().command
        else {
            panic!("not hosts remove")
        };
        assert_eq!(h.name, "gpu-7");
        assert!(parse(&["hosts", "remove"]).is_err(), "a name is required");
    }

    #[test]
    fn launch_as_root_and_with_a_request_id() {
        let Command::Launch(a) = parse(&["launch", "--", "/bin/true"]).unwrap().command else {
            panic!("not launch")
        };
        assert!(!a.run_as_root && a.request_id.is_none());
        let Command::Launch(a) = parse(&[
            "launch",
            "--run-as-root",
            "--request-id",
            "r1",
            "--",
            "/bin/true",
        ])
        .unwrap()
        .command
        else {
            panic!("not launch")
        };
        assert!(a.run_as_root);
        assert_eq!(a.request_id.as_deref(), Some("r1"));
    }

    #[test]
    fn definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
