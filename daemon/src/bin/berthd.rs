//! berthd: the berth host daemon. Thin: configuration, logging, signals, then the library.

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let args = berth_daemon::config::Args::parse();
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berthd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", cfg.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    init_tracing(&cfg.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berthd: start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let code = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        match berth_daemon::services::server::run(cfg, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "berthd failed");
                eprintln!("berthd: {e}");
                1
            }
        }
    });
    // Blocking tasks (a cgroup kill in progress) get a bounded moment, never forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    std::process::ExitCode::from(code)
}

async fn on_signals(shutdown: CancellationToken) {
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

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
