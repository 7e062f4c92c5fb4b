//! berth-scheduler: the berth scheduler node. Thin: configuration, logging, signals, then the
//! library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = berth_daemon::scheduler_config::SchedulerArgs::parse();
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth-scheduler: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", cfg.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    berth_daemon::init_tracing(&cfg.log_format);
    berth_daemon::serve_until_signalled("berth-scheduler", |shutdown| {
        berth_daemon::services::scheduler::server::run(cfg, shutdown)
    })
}
