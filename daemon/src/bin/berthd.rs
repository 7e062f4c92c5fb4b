//! berthd: the berth host daemon. Thin: configuration, logging, signals, then the library.

use clap::Parser;

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
    berth_daemon::serve_until_signalled("berthd", |shutdown| {
        berth_daemon::services::server::run(cfg, shutdown)
    })
}
