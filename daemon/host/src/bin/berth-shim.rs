//! berth-shim: the small per-worker process that outlives berthd (see `sys::shim`).

fn main() {
    std::process::exit(berth_sys::launcher::shim_main());
}
