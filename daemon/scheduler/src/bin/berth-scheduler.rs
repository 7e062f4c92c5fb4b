//! berth-scheduler: the berth scheduler node. Thin: configuration, logging, signals, then the
//! library.

fn main() -> std::process::ExitCode {
    berth_server::daemon_main::<berth_scheduler::config::SchedulerArgs, _, _, _>(
        "berth-scheduler",
        berth_scheduler::daemon::run,
    )
}
