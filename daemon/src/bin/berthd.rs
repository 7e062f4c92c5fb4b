//! berthd: the berth host daemon. Thin: configuration, logging, signals, then the library.

fn main() -> std::process::ExitCode {
    berth_daemon::daemon_main::<berth_daemon::config::Args, _, _>(
        "berthd",
        berth_daemon::services::server::run,
    )
}
