//! `berth`: launch, track and stop workers on a berth host daemon or scheduler.
//!
//! Exit status: 0 on success; 1 when a call fails or awaited workers fail; 2 on a usage error.

use std::process::ExitCode;

use berth_client::cli::{self, Cli, Terminal};
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Cli::parse();
    if let Err(e) = cli::check(&args) {
        e.exit();
    }
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let mut term = Terminal {
        out: &mut out,
        err: &mut err,
    };
    match cli::run(args, &mut term).await {
        Ok(outcome) => ExitCode::from(outcome.exit_status()),
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(term.err, "berth: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}
