//! The Python and R clients (`client/python`, `client/r`) tested against a real berthd: each
//! client's own suite (pytest, testthat) runs here, against a daemon of the harness, so that
//! `cargo test --workspace` runs them too and the harness checks what they leave behind.
//!
//! `tests/clients/setup.sh` prepares what they need (a venv with grpcio and the Python client
//! built from `proto/`; R, jsonlite and testthat from Debian's packages; the R client installed
//! in a library of its own). These tests are not in `tests/e2e/`: the cgroup-v2 tier runs the
//! daemon's behaviour there already, and interpreters under emulation would add minutes to it.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_client::pb;
use berth_tests::{bin, bin_dir, require_root, scaled, Daemon};

/// The examples of both clients listen on port 6000 of the host, as the workbench's do: one
/// client suite at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// Runs `setup.sh` once per test process; returns the `KEY=VALUE` lines it printed.
fn setup() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace().join("tests/clients/setup.sh"))
            .stdin(Stdio::null())
            .output()
            .expect("run tests/clients/setup.sh");
        assert!(
            out.status.success(),
            "tests/clients/setup.sh failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

/// Runs a client's suite against `d` (killed after `limit`, scaled) and fails the test with its
/// output unless it exits 0.
async fn run_suite(d: &Daemon, what: &str, mut cmd: Command, limit: Duration) {
    cmd.current_dir(workspace())
        .env("BERTH_ADDR", d.addr())
        .env("BERTH_TEST_ADDR", d.addr())
        .env("BERTH_TEST_GATEWAY", d.net.gateway())
        .env("BERTH_CLI", bin("berth"))
        .env("BERTH_BIN_DIR", bin_dir())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let limit = scaled(limit);
    let what = what.to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(limit) {
            Ok(out) => out.unwrap_or_else(|e| panic!("wait for {what}: {e}")),
            Err(_) => {
                // SAFETY: kill(2) with integers; the child is ours and not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("{what} did not finish within {limit:?}");
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), format!("== {what}\n{text}"))
    })
    .await
    .expect("suite thread");
    println!("{out}");
    assert_eq!(code, Some(0), "the suite failed:\n{out}");
}

/// What every client suite must leave: no worker of the daemon still running, and no worker
/// cgroup once their ends are recorded.
async fn assert_nothing_left(d: &Daemon) {
    let c = d.client().await.expect("client");
    let live = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            statuses: vec![
                pb::WorkerStatus::Pending as i32,
                pb::WorkerStatus::Starting as i32,
                pb::WorkerStatus::Running as i32,
            ],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .workers;
    assert!(
        live.is_empty(),
        "the suite left workers running: {:?}",
        live.iter().map(|w| &w.id).collect::<Vec<_>>()
    );
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !d.worker_cgroups().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        d.worker_cgroups(),
        Vec::<String>::new(),
        "worker cgroups left"
    );
}

#[tokio::test]
async fn python_client() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let env = setup();
    let d = Daemon::start().await.expect("daemon");
    let mut cmd = Command::new(&env["BERTH_CLIENT_PYTHON"]);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "client/python/tests",
    ]);
    run_suite(
        &d,
        "pytest client/python/tests",
        cmd,
        Duration::from_secs(600),
    )
    .await;
    assert_nothing_left(&d).await;
}

#[tokio::test]
async fn r_client() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let env = setup();
    let d = Daemon::start().await.expect("daemon");
    let mut cmd = Command::new("Rscript");
    cmd.arg("client/r/tests/run.R")
        .env("R_LIBS", &env["BERTH_CLIENT_RLIB"]);
    run_suite(
        &d,
        "Rscript client/r/tests/run.R",
        cmd,
        Duration::from_secs(600),
    )
    .await;
    assert_nothing_left(&d).await;
}
