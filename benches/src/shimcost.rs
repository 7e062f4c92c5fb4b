//! What a zygote saves per worker (README: "saves the exec and dynamic loading of the shim
//! binary"): the CPU time of starting a shim process by exec against by fork.
//!
//! In one run, alternating, `--runs` times each (medians of per-run CPU time, user + system, of
//! this process and its children together, from `getrusage`; wall time beside it):
//! - **exec**: fork/exec of the release `berth-shim` (beside this binary) with no arguments, to
//!   its exit: the kernel's exec, the dynamic loader, the Rust runtime's start and a usage line —
//!   what an exec'd shim pays before it reads its spec;
//! - **fork**: fork of this process, whose child exits at once — what a zygote-forked shim pays
//!   to exist (this process is bigger than a zygote, so its fork costs at least as much).
//!
//! The difference is what each worker saves. Run from a release build:
//! `cargo build --release -p berth-benches -p berth-host --bins &&
//! target/release/berth-bench-shim [--runs 500]`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{loadavg, median, ms, Flags};

/// User + system CPU time of this process and of its waited-for children so far.
fn cpu_now() -> Duration {
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `who` is a valid selector.
        unsafe { libc::getrusage(who, &mut ru) };
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    total
}

/// fork, the child `_exit`s at once; the parent waits.
fn fork_once() -> Result<()> {
    // SAFETY: the child calls only _exit (async-signal-safe); the parent waits for it.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        // SAFETY: _exit in the child of fork.
        0 => unsafe { libc::_exit(0) },
        pid => {
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                bail!("waitpid: {}", std::io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 500usize;
    let f = Flags::parse(
        "usage: berth-bench-shim [--runs N]",
        &args,
        &["--runs"],
        &[],
    )?;
    f.set("--runs", &mut runs)?;
    let shim: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .join("berth-shim");
    if !shim.exists() {
        bail!(
            "{} missing: cargo build --release -p berth-host --bins",
            shim.display()
        );
    }
    println!(
        "# shim start cost: exec of {} vs fork ({} runs each, load {})",
        shim.display(),
        runs,
        loadavg()
    );
    let (mut exec_cpu, mut exec_wall, mut fork_cpu, mut fork_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (c, t) = (cpu_now(), Instant::now());
        let st = Command::new(&shim)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        exec_wall.push(t.elapsed());
        exec_cpu.push(cpu_now() - c);
        if st.code() != Some(2) {
            bail!("berth-shim without arguments exited {st}, not 2 (usage)");
        }
        let (c, t) = (cpu_now(), Instant::now());
        fork_once()?;
        fork_wall.push(t.elapsed());
        fork_cpu.push(cpu_now() - c);
    }
    // getrusage counts in ticks on some kernels: the means say more than medians there.
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    let (ec, fc) = (mean(&exec_cpu), mean(&fork_cpu));
    println!();
    println!(
        "| start of a shim process, to its exit | CPU (mean) | CPU (median) | wall (median) |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| exec: fork/exec of berth-shim, loader, runtime start, usage line | {} | {} | {} |",
        ms(ec),
        ms(median(&mut exec_cpu)),
        ms(median(&mut exec_wall))
    );
    println!(
        "| fork: fork of this process, the child exits at once | {} | {} | {} |",
        ms(fc),
        ms(median(&mut fork_cpu)),
        ms(median(&mut fork_wall))
    );
    println!();
    println!(
        "CPU a zygote saves per worker (exec − fork, means): {}; load {}",
        ms(ec.saturating_sub(fc)),
        loadavg()
    );
    Ok(())
}
