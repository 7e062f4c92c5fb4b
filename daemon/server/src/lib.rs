//! The gRPC edge that berthd (berth-host) and berth-scheduler both serve through, so that it
//! exists once: one `berth.v1.Workers` service over a [`workers::WorkersBackend`] (requests
//! checked here), protobuf ↔ domain conversions ([`convert`], errors → statuses in one place),
//! listeners, health and reflection ([`front`]), load limits ([`limits`]), `/metrics`
//! ([`metrics`]), the configuration path ([`config`]) and the daemons' `main` ([`daemon_main`]).

pub mod config;
pub mod convert;
pub mod front;
pub mod gates;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod workers;

pub use front::ServeError;

use std::future::Future;

use tracing::Instrument as _;

/// Spawns `task` inside `span`, so that every line it logs carries the span's fields (a worker's
/// id and session, a host's name): one worker's story can be read from the logs.
pub fn spawn_in<F>(span: tracing::Span, task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.instrument(span))
}

/// The span of a task that looks after one worker.
pub fn worker_span(id: &str, session: Option<&str>) -> tracing::Span {
    tracing::info_span!("worker", id = %id, session = session.unwrap_or(""))
}

/// Version reported in `HostInfo` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Cancels `shutdown` at the first SIGTERM or SIGINT.
pub async fn on_signals(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}

/// Logs to stderr, `text` or `json`, filtered by `BERTH_LOG` (default `info`).
pub fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // journald stamps every line itself: a second time in the line would only repeat it.
    match (format == "json", stderr_is_journal()) {
        (true, false) => builder.json().init(),
        (true, true) => builder.json().without_time().init(),
        (false, false) => builder.init(),
        (false, true) => builder.without_time().init(),
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to its `DEV:INO`
/// (systemd.exec(5)), which a redirected stderr no longer matches.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    parse_journal_stream(&stream.to_string_lossy()) == Some((meta.dev(), meta.ino()))
}

/// `DEV:INO` of `JOURNAL_STREAM`, both decimal.
fn parse_journal_stream(text: &str) -> Option<(u64, u64)> {
    let (dev, ino) = text.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The whole `main` of berthd and berth-scheduler: parse the command line, load the
/// configuration it selects (exit status 2 when that fails), print it with `--print-config`,
/// start logging, and run `serve` until SIGTERM or SIGINT.
pub fn daemon_main<A, F, Fut, E>(program: &str, serve: F) -> std::process::ExitCode
where
    A: config::DaemonArgs,
    F: FnOnce(A::Config, tokio_util::sync::CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use config::DaemonConfig as _;
    let args = A::parse();
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config() {
        print!("{}", cfg.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    init_tracing(cfg.log_format());
    serve_until_signalled(program, |shutdown| serve(cfg, shutdown))
}

/// Runs `serve` on a multi-threaded runtime until it returns; SIGTERM or SIGINT cancel the token
/// it gets. Exit status 0 when it returned Ok, 1 otherwise (said on stderr and in the log).
pub fn serve_until_signalled<F, Fut, E>(program: &str, serve: F) -> std::process::ExitCode
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let code = rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        match serve(shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "{program} failed");
                eprintln!("{program}: {e}");
                1
            }
        }
    });
    // Blocking tasks (a cgroup kill in progress) get a bounded moment, never forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    std::process::ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::parse_journal_stream;

    #[test]
    fn journal_stream_is_dev_colon_ino() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("12345"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
    }
}
