//! berth-shim: the small per-worker process that outlives berthd (see `berth_sys::launcher`).

fn main() {
    std::process::exit(berth_sys::launcher::shim_main());
}
