//! berthd: the berth host daemon. Thin: configuration, logging, signals, then the library.

fn main() -> std::process::ExitCode {
    berth_server::daemon_main::<berth_host::config::Args, _, _, _>(
        "berthd",
        berth_host::daemon::run,
    )
}
