//! Starting workers, in four layers, each using only the ones below it:
//!
//! - [`spawn`] (the daemon's side, the way in): writes a worker's spec into its directory and
//!   asks a zygote for its shim, or execs the shim where no zygote can be had;
//! - `zygote`: a pre-started `berth-shim --zygote` that forks every shim;
//! - `shim`: the small process that starts one worker in its cgroup and namespace, keeps its
//!   output and records its end, and outlives the daemon;
//! - `proc`: pipes, pidfds, reaping and signalfds, which all of them share.
//!
//! The rest of berth uses what this module exports: a [`Spawner`] to start shims, the spec and
//! the records a shim leaves ([`ShimSpec`], [`Handshake`], [`ExitRecord`]), and [`shim_main`],
//! the `berth-shim` binary.

mod creds;
pub mod pool;
mod proc;
mod shim;
mod spawn;
mod zygote;

use std::path::Path;

pub use creds::{cap_number, default_rlimits, CredsError, Rlimit, WorkerCreds};
pub use proc::{exit_status, pidfd_exit, pidfd_kill, pidfd_open, reap, PidfdExit};
pub use shim::{
    decode_status, mark_started, parse_handshake, read_exit, ExitRecord, Handshake, ShimSpec,
    EXIT_FILE, SOURCE_FILE, SPEC_FILE, STARTED_FILE,
};
pub use spawn::{write_spec, ShimHandle, ShimSpawner, SpawnError, Spawner};

/// Entry point of the `berth-shim` binary: `berth-shim WORKER_DIR` runs the shim of one worker,
/// `berth-shim --zygote` a zygote. Returns the process exit code.
pub fn shim_main() -> i32 {
    let Some(arg) = std::env::args_os().nth(1) else {
        eprintln!(
            "usage: berth-shim WORKER_DIR | berth-shim {}",
            zygote::ZYGOTE_ARG
        );
        return 2;
    };
    if arg == zygote::ZYGOTE_ARG {
        return zygote::serve();
    }
    shim::run_dir(Path::new(&arg))
}
