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
    berth_daemon::init_tracing(&cfg.log_format);
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
        tokio::spawn(berth_daemon::on_signals(shutdown.clone()));
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
