//! `berth`: launch, track and stop workers on a berth host daemon or scheduler.
//!
//! Exit status: 0 on success; 1 when a call fails or awaited workers fail; 2 on a usage error.
//! With `--json`, a failure is also told as one JSON document on stderr (client/JSON.md).

use std::process::ExitCode;

use berth_client::cli::{self, Cli, Terminal};
use clap::Parser;

fn main() -> ExitCode {
    let json = cli::wants_json(std::env::args_os());
    let args = match Cli::try_parse().and_then(|a| cli::check(&a).map(|()| a)) {
        Ok(a) => a,
        // Help and version are no errors: clap prints them on stdout.
        Err(e) if json && e.use_stderr() => {
            eprintln!("{}", cli::usage_error_json(&e));
            return ExitCode::from(cli::EXIT_USAGE);
        }
        Err(e) => e.exit(),
    };
    if args.is_holder() {
        cli::holder::close_inherited_fds();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    runtime.block_on(run(args, json))
}

async fn run(args: Cli, json: bool) -> ExitCode {
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
            let _ = if json {
                writeln!(term.err, "{}", e.to_json())
            } else {
                writeln!(term.err, "berth: {e}")
            };
            ExitCode::from(e.exit_status())
        }
    }
}
