//! berth-scheduler: the berth scheduler node. Thin: configuration, logging, signals, then the
//! library.

fn main() -> std::process::ExitCode {
    berth_daemon::daemon_main::<berth_daemon::scheduler_config::SchedulerArgs, _, _>(
        "berth-scheduler",
        berth_daemon::services::scheduler::server::run,
    )
}
