//! Phase marks of a launch, for the benchmarks' per-phase breakdown (`berth-bench-e2e`): debug
//! events of target `berth_phase` carrying the phase's name, the worker where there is one, and
//! `t_us`, `CLOCK_MONOTONIC` in microseconds (the clock a client on the same machine reads too).
//! Off unless the log filter enables that target (`BERTH_LOG=info,berth_phase=debug`); while it
//! is off a mark costs one cached level check and reads no clock.

/// `CLOCK_MONOTONIC` now, in microseconds.
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// `phase!("name")` marks a launch-wide phase boundary; `phase!("name", id)` one of worker `id`.
#[macro_export]
macro_rules! phase {
    ($name:literal) => {
        tracing::debug!(target: "berth_phase", phase = $name, t_us = $crate::phase::now_us())
    };
    ($name:literal, $id:expr) => {
        tracing::debug!(
            target: "berth_phase",
            phase = $name,
            worker = %$id,
            t_us = $crate::phase::now_us()
        )
    };
}
