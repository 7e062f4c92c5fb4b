//! berth-shim: the small per-worker process that outlives berthd (see `sys::shim`).

fn main() {
    std::process::exit(berth_daemon::sys::launcher::shim_main());
}
