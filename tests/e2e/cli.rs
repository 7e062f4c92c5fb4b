//! End-to-end tests of the `berth` command-line tool: the real binary against a real berthd on
//! a Unix socket. What is checked is what a person or a script sees: exit status, tables, JSON
//! documents, and the workers' output byte for byte.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_tests::open_session;
use berth_tests::{bin, require_root, scaled, Daemon};
use serde_json::Value;

/// What one run of `berth` left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is no JSON document ({e}): {self:?}"))
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Runs `berth --addr <daemon> ARGS` in `cwd` (default: the test's own) and waits for it,
/// killing it after 90 s (scaled) so a hanging CLI fails the test instead of blocking it.
async fn berth_in(d: &Daemon, cwd: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin("berth"));
    cmd.arg("--addr")
        .arg(d.addr())
        .args(args)
        .env_remove("BERTH_ADDR")
        .stdin(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let what = format!("berth {args:?}");
    tokio::task::spawn_blocking(move || {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run berth");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(scaled(Duration::from_secs(90))) {
            Ok(out) => out.expect("wait for berth"),
            Err(_) => {
                // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("{what} did not finish in time");
            }
        };
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("berth runner")
}

/// `--timeout` of a `berth await` that waits for workers to get there: the server's default (60 s),
/// stretched like every other wait of the tests (a slow machine may take longer to run them).
fn await_timeout() -> String {
    scaled(Duration::from_secs(60)).as_secs().to_string()
}

async fn berth(d: &Daemon, args: &[&str]) -> Run {
    berth_in(d, None, args).await
}

/// Small workers, so that many fit on a small test machine.
const SMALL: [&str; 4] = ["--cpu", "0.1", "--memory", "0.125"];

/// `berth --json launch SMALL EXTRA...` and the ids of the launched workers.
async fn launch(d: &Daemon, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--json", "launch"];
    args.extend(SMALL);
    args.extend(extra);
    let r = berth(d, &args).await;
    r.ok();
    ids(&r.json()["workers"])
}

fn ids(workers: &Value) -> Vec<String> {
    workers
        .as_array()
        .unwrap_or_else(|| panic!("not a list of workers: {workers}"))
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect()
}

fn args_with<'a>(head: &[&'a str], ids: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(ids.iter().map(String::as_str))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_wait_exit_status() {
    require_root!();
    let d = Daemon::start().await.unwrap();

    let mut args = vec!["launch", "--wait"];
    args.extend(SMALL);
    let ok = berth(&d, &[&args[..], &["--", "/bin/true"]].concat()).await;
    ok.ok();
    let table = ok.stdout();
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("succeeded") && !table.contains("FAILURES"),
        "{table}"
    );

    let bad = berth(&d, &[&args[..], &["-n", "2", "--", "/bin/false"]].concat()).await;
    assert_eq!(bad.code, 1, "{bad:?}");
    let table = bad.stdout();
    assert!(table.contains("FAILURES (2)"), "{table}");
    assert!(table.contains("exited with code 1"), "{table}");
    assert!(bad.stderr.contains("2 of 2"), "{bad:?}");

    // Plain `await` of them: the one that succeeded, and the two that failed.
    let all = berth(&d, &["--json", "list"]).await;
    let all = ids(&all.ok().json()["workers"]);
    assert_eq!(all.len(), 3);
    let t = await_timeout();
    let r = berth(&d, &args_with(&["--json", "await", "--timeout", &t], &all)).await;
    assert_eq!(r.code, 1, "{r:?}");
    let v = r.json();
    assert_eq!(v["workers"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["failures"].as_array().unwrap().len(), 2, "{v}");
    for w in v["failures"].as_array().unwrap() {
        assert_eq!(w["status"], "WORKER_STATUS_FAILED", "{w}");
        assert_eq!(w["exit_code"], 1, "{w}");
    }
    let id = v["workers"][0]["id"].as_str().unwrap();
    let r = berth(&d, &["await", "--timeout", &t, id]).await;
    r.ok();

    // --attach: the output on our stdout and stderr, then the exit status of the workers.
    let r = berth(
        &d,
        &[
            &args[..1],
            &SMALL,
            &["--attach", "--", "/bin/sh", "-c", "echo out; echo err >&2"],
        ]
        .concat(),
    )
    .await;
    r.ok();
    assert_eq!((r.stdout(), r.stderr.as_str()), ("out\n".into(), "err\n"));
    let r = berth(
        &d,
        &[
            &args[..1],
            &SMALL,
            &[
                "-n",
                "2",
                "--attach",
                "--",
                "/bin/sh",
                "-c",
                "echo $BERTH_WORKER_ID; exit 4",
            ],
        ]
        .concat(),
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    let out = r.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in lines {
        // Several workers: each line carries its worker's id, here also its content.
        let id = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] "))
            .unwrap_or_else(|| panic!("no [id] prefix: {line:?}"));
        assert_eq!(id.0, id.1, "{line}");
    }
    assert!(r.stderr.contains("exited with code 4"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_carry_the_fields() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let cwd_path = cwd.path().canonicalize().unwrap();
    let mut args = vec!["--json", "launch", "-n", "2"];
    args.extend(SMALL);
    args.extend([
        "--label",
        "team=ml",
        "--env",
        "MY_VAR=a b=c",
        "--network",
        "none",
        "--",
        "/bin/sh",
        "-c",
        "printf '%s|%s' \"$MY_VAR\" \"$(pwd)\"",
    ]);
    let r = berth_in(&d, Some(&cwd_path), &args).await;
    let v = r.ok().json();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{v}");
    for w in workers {
        for field in [
            "id",
            "session_id",
            "host",
            "ip_address",
            "status",
            "cpu",
            "memory_gb",
            "command",
            "pid",
            "exit_code",
            "reason",
            "labels",
            "created_at",
            "workdir",
            "network",
        ] {
            assert!(w.get(field).is_some(), "no {field} in {w}");
        }
        assert_eq!(w["host"], d.name.as_str());
        assert_eq!(w["cpu"], 0.1);
        assert_eq!(w["labels"]["team"], "ml");
        assert_eq!(w["network"], "NETWORK_MODE_NONE");
        // The CLI's current directory is the default workdir.
        assert_eq!(w["workdir"], cwd_path.to_str().unwrap());
        assert_eq!(w["command"][0], "/bin/sh");
        assert!(w["status"].as_str().unwrap().starts_with("WORKER_STATUS_"));
        assert!(w["created_at"].as_str().unwrap().ends_with('Z'), "{w}");
    }
    let launched = ids(&v["workers"]);

    let t = await_timeout();
    let r = berth(
        &d,
        &args_with(&["--json", "await", "--timeout", &t], &launched),
    )
    .await;
    let v = r.ok().json();
    assert_eq!(ids(&v["workers"]), launched, "in launch order: {v}");
    assert_eq!(v["failures"], serde_json::json!([]));
    for w in v["workers"].as_array().unwrap() {
        assert_eq!(w["status"], "WORKER_STATUS_SUCCEEDED");
        assert_eq!(w["exit_code"], 0);
        assert!(w["finished_at"].is_string(), "{w}");
    }
    let out = berth(&d, &["logs", &launched[0]]).await;
    assert_eq!(out.ok().stdout(), format!("a b=c|{}", cwd_path.display()));

    let v = berth(&d, &args_with(&["--json", "list"], &launched[..1]))
        .await
        .ok()
        .json();
    assert_eq!(ids(&v["workers"]), launched[..1]);

    let v = berth(&d, &["--json", "info"]).await.ok().json();
    assert_eq!(v["name"], d.name.as_str());
    assert!(v["capacity"]["cpu"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cgroup_version"] == 1 || v["cgroup_version"] == 2, "{v}");
    assert!(
        v["kernels"].as_array().is_some_and(|k| !k.is_empty()),
        "{v}"
    );
    let info = berth(&d, &["info"]).await;
    let text = info.ok().stdout();
    assert!(text.starts_with("name "), "{text}");
    assert!(
        text.contains(&d.name) && text.contains("RESOURCE"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_byte_exact() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    // Every byte value, no final newline, and something on stderr.
    let code = "import sys\n\
                sys.stdout.buffer.write(bytes(range(256)) * 64)\n\
                sys.stdout.buffer.write(b'\\r\\nend')\n\
                sys.stderr.write('warning: x\\n')\n";
    let mut want: Vec<u8> = (0..=255u8).collect::<Vec<u8>>().repeat(64);
    want.extend_from_slice(b"\r\nend");
    let id = launch(&d, &["--code", code]).await.remove(0);
    berth(&d, &["await", "--timeout", &await_timeout(), &id])
        .await
        .ok();

    let r = berth(&d, &["logs", &id]).await;
    assert_eq!(r.ok().stdout, want);
    assert_eq!(r.stderr, "warning: x\n");
    let r = berth(&d, &["logs", "--stdout", &id]).await;
    assert_eq!((r.ok().stdout == want, r.stderr.as_str()), (true, ""));
    let r = berth(&d, &["logs", "--stderr", &id]).await;
    assert_eq!(
        (r.ok().stdout(), r.stderr.as_str()),
        (String::new(), "warning: x\n")
    );
    // --tail starts at the end: nothing of an ended worker.
    let r = berth(&d, &["logs", "--tail", &id]).await;
    assert!(r.ok().stdout.is_empty() && r.stderr.is_empty(), "{r:?}");

    // -f follows a running worker to its end, and misses nothing written before.
    let code = "import sys, time\n\
                sys.stdout.buffer.write(b'one\\n'); sys.stdout.flush()\n\
                time.sleep(0.5)\n\
                sys.stdout.buffer.write(b'\\x00two')\n";
    let follow = launch(&d, &["--code", code]).await.remove(0);
    let r = berth(&d, &["logs", "-f", &follow]).await;
    assert_eq!(r.ok().stdout, b"one\n\x00two");
    let list = berth(&d, &["--json", "list", &follow]).await.ok().json();
    assert_eq!(list["workers"][0]["status"], "WORKER_STATUS_SUCCEEDED");

    // Two workers: prefixed lines; the same worker named twice is still one.
    let r = berth(&d, &["logs", "--stderr", &id, &follow]).await;
    assert_eq!(r.ok().stderr, format!("[{id}] warning: x\n"));
    let r = berth(&d, &["logs", "--stdout", &follow, &id]).await;
    let out = &r.ok().stdout;
    assert!(
        out.windows(follow.len() + 7)
            .any(|w| w == format!("[{follow}] one\n").as_bytes()),
        "{r:?}"
    );
    let r = berth(&d, &["logs", &follow, &follow]).await;
    assert_eq!(r.ok().stdout, b"one\n\x00two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_call_errors() {
    require_root!();
    let d = Daemon::start().await.unwrap();

    // Usage errors are refused before any call: exit status 2.
    for args in [
        &["stop"][..],
        &["stop", "--grace", "1"],
        &["logs"],
        &["launch", "--env", "NOVALUE", "--", "/bin/true"],
        &["--json", "launch", "--attach", "--", "/bin/true"],
        &["launch", "--code", "1", "--", "/bin/true"],
    ] {
        let r = berth(&d, args).await;
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stdout.is_empty(), "{args:?}: {r:?}");
    }
    let r = berth(&d, &["launch", "--label", "=x", "--", "/bin/true"]).await;
    assert!(r.stderr.contains("KEY=VALUE"), "{r:?}");

    // A malformed request: the server's INVALID_ARGUMENT, naming the field.
    let r = berth(&d, &["launch", "--cpu", "0", "--", "/bin/true"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("berth: INVALID_ARGUMENT: "), "{r:?}");
    assert!(r.stderr.contains("cpu"), "{r:?}");
    assert!(r.stdout.is_empty());
    let r = berth(&d, &["launch", "--master-ip", "nope", "--", "/bin/true"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("master_ip"), "{r:?}");
    let r = berth(&d, &["launch", "--memory", "100000", "--", "/bin/true"]).await;
    assert!(
        r.code == 1 && r.stderr.starts_with("berth: RESOURCE_EXHAUSTED: "),
        "{r:?}"
    );
    let r = berth(
        &d,
        &[&["launch"][..], &SMALL, &["--", "/no/such/program"]].concat(),
    )
    .await;
    assert!(
        r.code == 1 && r.stderr.starts_with("berth: FAILED_PRECONDITION: "),
        "{r:?}"
    );
    // Nothing was launched by any of them.
    let v = berth(&d, &["--json", "list"]).await.ok().json();
    assert_eq!(v["workers"], serde_json::json!([]));

    for args in [
        &["list", "nosuchworker7"][..],
        &["stop", "nosuchworker7"],
        &["logs", "nosuchworker7"],
        &["await", "nosuchworker7"],
    ] {
        let r = berth(&d, args).await;
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.starts_with("berth: NOT_FOUND: "),
            "{args:?}: {r:?}"
        );
        assert!(r.stderr.contains("nosuchworker7"), "{args:?}: {r:?}");
    }

    // A host daemon serves no cluster.
    let r = berth(&d, &["hosts"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("berth: UNIMPLEMENTED: "), "{r:?}");
    assert!(r.stderr.contains("berth-scheduler"), "{r:?}");

    // No server at the address.
    let gone = d.dir.join("nobody.sock");
    let r = berth(&d, &["--addr", &format!("unix:{}", gone.display()), "list"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("berth: UNAVAILABLE: "), "{r:?}");
    assert!(r.stderr.contains("nobody.sock"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_await_and_stop() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let sleepers = launch(&d, &["-n", "2", "--", "sleep", "60"]).await;
    let done = launch(&d, &["--", "/bin/true"]).await;
    let t = await_timeout();
    let r = berth(
        &d,
        &args_with(&["await", "--running", "--timeout", &t], &sleepers),
    )
    .await;
    assert!(r.ok().stdout().matches("running").count() == 2, "{r:?}");
    berth(&d, &args_with(&["await", "--timeout", &t], &done))
        .await
        .ok();

    let r = berth(&d, &["list"]).await;
    let table = r.ok().stdout();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for h in ["ID", "STATUS", "HOST", "IP", "CPU", "MEM", "PID", "AGE"] {
        assert!(lines[0].split_whitespace().any(|c| c == h), "{h}: {table}");
    }
    for id in sleepers.iter().chain(&done) {
        let line = lines
            .iter()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed: {table}"));
        let want = if done.contains(id) {
            "succeeded"
        } else {
            "running"
        };
        assert_eq!(line.split_whitespace().nth(1), Some(want), "{table}");
        assert!(line.contains(&d.name), "{table}");
    }
    let r = berth(&d, &["ps", "--status", "running"]).await;
    let table = r.ok().stdout();
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(!table.contains(&done[0]), "{table}");

    // A short await of running workers times out: they are failures.
    let r = berth(&d, &args_with(&["await", "--timeout", "1"], &sleepers[..1])).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout().starts_with("FAILURES (1)"), "{r:?}");

    let r = berth(&d, &args_with(&["stop", "--grace", "0"], &sleepers[..1])).await;
    let table = r.ok().stdout();
    assert!(
        table.contains(&sleepers[0]) && table.contains("stopped"),
        "{table}"
    );
    let v = berth(&d, &["--json", "stop", "--all", "--grace", "0"])
        .await
        .ok()
        .json();
    assert!(ids(&v["workers"]).contains(&sleepers[1]), "{v}");
    let v = berth(&d, &["--json", "ps", "--status", "stopped"])
        .await
        .ok()
        .json();
    let mut stopped = ids(&v["workers"]);
    stopped.sort();
    let mut want = sleepers.clone();
    want.sort();
    assert_eq!(stopped, want, "{v}");
    // Stopped is no success.
    let r = berth(&d, &args_with(&["await", "--timeout", &t], &sleepers)).await;
    assert_eq!(r.code, 1, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_selects_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let s = open_session(&c, 60).await;
    let ids = launch(
        &d,
        &[
            "-n",
            "2",
            "--session",
            &s.id,
            "--",
            "/bin/sh",
            "-c",
            "printf 'a\\nb'",
        ],
    )
    .await;
    let r = berth(
        &d,
        &["await", "--timeout", &await_timeout(), "--session", &s.id],
    )
    .await;
    r.ok();
    let r = berth(&d, &["logs", "--session", &s.id]).await;
    let out = r.ok().stdout();
    // Lines of the two workers may interleave, never their bytes; the unfinished last line
    // of each is ended.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for id in &ids {
        let of: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("[{id}] ")))
            .collect();
        assert_eq!(of, ["a", "b"], "{out}");
    }
    let r = berth(&d, &["--json", "list", "--session", &s.id]).await;
    let mut listed = ids_of(&r.ok().json());
    listed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);
    let table = berth(&d, &["list", "--session", &s.id]).await.ok().stdout();
    assert!(table.lines().next().unwrap().contains("SESSION"), "{table}");
}

fn ids_of(v: &Value) -> Vec<String> {
    ids(&v["workers"])
}

/// `berth launch SMALL EXTRA` started in the background, with its stdout and stderr piped.
fn spawn_berth(d: &Daemon, extra: &[&str]) -> std::process::Child {
    Command::new(bin("berth"))
        .arg("--addr")
        .arg(d.addr())
        .arg("launch")
        .args(SMALL)
        .args(extra)
        .env_remove("BERTH_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run berth")
}

/// Waits for the first line of `child`'s stdout (the worker's), which shows that the CLI
/// follows the worker with its signal handlers in place, then sends it `signal` and waits for
/// it: its exit status (`None` when a signal ended it) and its stderr.
async fn signal_after_first_line(
    mut child: std::process::Child,
    signal: i32,
) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        expect_started(&mut child, &mut out);
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = child.id();
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for berth");
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let _ = tx.send((status.code(), err));
        });
        rx.recv_timeout(scaled(Duration::from_secs(60)))
            .unwrap_or_else(|_| {
                // SAFETY: kill(2) on the pid of a child we spawned.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("berth did not end within a minute of signal {signal}");
            })
    })
    .await
    .unwrap()
}

/// Reads the first line of a `berth launch --attach` worker's output from `out`; if it is not
/// `started`, fails with what berth said on stderr.
#[track_caller]
fn expect_started(child: &mut std::process::Child, out: &mut impl std::io::BufRead) {
    use std::io::Read;
    let mut line = String::new();
    out.read_line(&mut line).expect("read berth's stdout");
    if line != "started\n" {
        let status = child.wait();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("berth printed {line:?} first, then exited with {status:?}: {err}");
    }
}

/// The one worker of the daemon.
async fn only_worker(d: &Daemon) -> Value {
    let v = berth(d, &["--json", "list"]).await.ok().json();
    let ws = v["workers"].as_array().unwrap();
    assert_eq!(ws.len(), 1, "{v}");
    ws[0].clone()
}

const STARTED_THEN_SLEEP: [&str; 4] = ["--", "/bin/sh", "-c", "echo started; exec sleep 1000"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_of_attach_closes_its_session_and_stops_the_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let child = spawn_berth(&d, &[&["--attach"][..], &STARTED_THEN_SLEEP].concat());
    let (code, stderr) = signal_after_first_line(child, libc::SIGINT).await;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT: closed session "), "{stderr}");
    // CloseSession returned before berth exited: the worker has ended already.
    let w = only_worker(&d).await;
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{w}");
    assert_eq!(w["reason"], "session ended", "{w}");
    let session = w["session_id"].as_str().unwrap();
    assert!(!session.is_empty(), "{w}");
    assert!(stderr.contains(session), "{stderr}");
    // The session is over: it takes no more workers.
    let r = berth(
        &d,
        &[
            &["launch", "--session", session][..],
            &SMALL,
            &["--", "/bin/true"],
        ]
        .concat(),
    )
    .await;
    assert!(r.code == 1 && r.stderr.contains("NOT_FOUND"), "{r:?}");

    // SIGTERM too, with its own exit status.
    let child = spawn_berth(&d, &[&["--attach"][..], &STARTED_THEN_SLEEP].concat());
    let (code, stderr) = signal_after_first_line(child, libc::SIGTERM).await;
    assert_eq!(code, Some(143), "{stderr}");
    let v = berth(&d, &["--json", "list", "--status", "running"])
        .await
        .ok()
        .json();
    assert_eq!(v["workers"], serde_json::json!([]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_attach_lets_its_lease_lapse() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let ttl = scaled(Duration::from_secs(2)).as_secs();
    let child = spawn_berth(
        &d,
        &[
            &["--attach", "--session-ttl", &ttl.to_string()][..],
            &STARTED_THEN_SLEEP,
        ]
        .concat(),
    );
    // Alive for several leases: the CLI keeps the session going.
    let child = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        expect_started(&mut child, &mut out);
        child
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2 * ttl)).await;
    let w = only_worker(&d).await;
    assert_eq!(
        w["status"], "WORKER_STATUS_RUNNING",
        "kept alive past its TTL: {w}"
    );
    let id = w["id"].as_str().unwrap().to_owned();

    let mut child = child;
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    // The lease lapses within the TTL, the expiry check follows within a second, and `sleep`
    // ends at the SIGTERM (the grace would allow 10 s more).
    let r = berth(&d, &["--json", "await", "--timeout", "60", &id]).await;
    let took = killed.elapsed();
    let w = &r.json()["failures"][0];
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{r:?}");
    assert_eq!(w["reason"], "session ended", "{w}");
    assert!(
        took < Duration::from_secs(ttl) + scaled(Duration::from_secs(4)),
        "stopped {took:?} after berth was killed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_of_attach_to_a_given_session_leaves_it_open() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let s = open_session(&c, 60).await;
    let child = spawn_berth(
        &d,
        &[&["--attach", "--session", &s.id][..], &STARTED_THEN_SLEEP].concat(),
    );
    let (code, stderr) = signal_after_first_line(child, libc::SIGINT).await;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("session {} stays open", s.id)),
        "{stderr}"
    );
    let w = only_worker(&d).await;
    assert_eq!(w["status"], "WORKER_STATUS_RUNNING", "{w}");
    assert_eq!(w["session_id"], s.id.as_str(), "{w}");
    // Still open: it renews, and closing it is what stops the worker.
    c.workers()
        .keep_alive(berth_tests::pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap();
    c.workers()
        .close_session(berth_tests::pb::CloseSessionRequest {
            session_id: s.id.clone(),
            grace_seconds: Some(0),
        })
        .await
        .unwrap();
    let w = only_worker(&d).await;
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{w}");

    // A session that does not exist is refused before anything is launched.
    let r = berth(
        &d,
        &[
            &["launch", "--attach", "--session", "nosuchsession3"][..],
            &SMALL,
            &["--", "/bin/true"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("berth: NOT_FOUND: "), "{r:?}");
    assert_eq!(only_worker(&d).await["session_id"], s.id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_of_wait_leaves_workers_running() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let mut child = spawn_berth(&d, &["--wait", "--", "sleep", "1000"]);
    // The worker runs: berth waits, its Ctrl-C handler in place.
    let c = d.client().await.unwrap();
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(20));
    let id = loop {
        let ws = c
            .workers()
            .list_workers(berth_tests::pb::ListWorkersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .workers;
        if let Some(w) = ws.first() {
            break w.id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "nothing launched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    berth_tests::await_running(&c, std::slice::from_ref(&id)).await;
    // berth catches SIGINT once the launch has answered (until then Ctrl-C kills it outright).
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(20));
    while !berth_tests::catches_signal(child.id(), libc::SIGINT) {
        assert!(
            std::time::Instant::now() < deadline,
            "berth never caught SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    })
    .await
    .unwrap();
    assert_eq!(out.0, Some(130), "{}", out.1);
    assert!(
        out.1
            .contains(&format!("interrupted; the workers keep running: {id}")),
        "{}",
        out.1
    );
    let v = berth(&d, &["--json", "list", &id]).await.ok().json();
    assert_eq!(v["workers"][0]["status"], "WORKER_STATUS_RUNNING", "{v}");
    berth(&d, &["stop", "--grace", "0", &id]).await.ok();
}

/// The type of a JSON value, as client/JSON.md names them.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks a worker document against the contract of client/JSON.md: every field, each of its
/// type (`null` allowed where the field may be unset).
#[track_caller]
fn assert_worker_document(w: &Value) {
    let fields: &[(&str, &str, bool)] = &[
        ("id", "string", false),
        ("session_id", "string", false),
        ("host", "string", false),
        ("ip_address", "string", false),
        ("status", "string", false),
        ("cpu", "number", false),
        ("memory_gb", "number", false),
        ("nvidia_gpu", "number", false),
        ("gpu_uuids", "array", false),
        ("kernel", "string", false),
        ("command", "array", false),
        ("pid", "number", false),
        ("exit_code", "number", true),
        ("signal", "number", true),
        ("reason", "string", false),
        ("restarts", "number", false),
        ("labels", "object", false),
        ("created_at", "string", false),
        ("started_at", "string", true),
        ("finished_at", "string", true),
        ("cpu_seconds", "number", false),
        ("memory_peak_bytes", "number", false),
        ("workdir", "string", false),
        ("network", "string", false),
        ("gpu_memory_used_bytes", "number", false),
        ("owner", "string", false),
        ("user", "string", false),
        ("pooled", "boolean", false),
        ("output_dropped_bytes", "number", false),
        ("request_id", "string", false),
    ];
    let obj = w.as_object().unwrap_or_else(|| panic!("no object: {w}"));
    for (name, ty, nullable) in fields {
        let v = obj.get(*name).unwrap_or_else(|| panic!("no {name} in {w}"));
        let got = json_type(v);
        assert!(
            got == *ty || (*nullable && got == "null"),
            "{name} is {got}, not {ty}: {w}"
        );
    }
    assert_eq!(obj.len(), fields.len(), "fields beyond the contract: {w}");
    assert!(w["status"].as_str().unwrap().starts_with("WORKER_STATUS_"));
    assert!(w["network"].as_str().unwrap().starts_with("NETWORK_MODE_"));
}

/// The error document that `--json` writes on stderr: one line, `{"error": {code, message}}`.
#[track_caller]
fn error_document(r: &Run) -> (String, String) {
    assert!(r.stdout.is_empty(), "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{r:?}");
    let v: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("stderr is no JSON document ({e}): {r:?}"));
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let e = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(e.len(), 2, "{v}");
    (
        e["code"].as_str().unwrap().to_owned(),
        e["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_contract_of_workers_and_errors() {
    require_root!();
    let d = Daemon::start().await.unwrap();

    // Launched: not started or not ended yet, so what is unset is null.
    let v = berth(
        &d,
        &[&["--json", "launch"][..], &SMALL, &["--", "sleep", "1000"]].concat(),
    )
    .await
    .ok()
    .json();
    let w = &v["workers"][0];
    assert_worker_document(w);
    assert_eq!(w["exit_code"], Value::Null, "{w}");
    assert_eq!(w["signal"], Value::Null, "{w}");
    assert_eq!(w["finished_at"], Value::Null, "{w}");
    assert_eq!(w["session_id"], "", "{w}");
    let id = w["id"].as_str().unwrap().to_owned();
    let t = await_timeout();
    let v = berth(&d, &["--json", "await", "--running", "--timeout", &t, &id])
        .await
        .ok()
        .json();
    let w = &v["workers"][0];
    assert_worker_document(w);
    assert_eq!(w["status"], "WORKER_STATUS_RUNNING");
    assert!(w["started_at"].as_str().unwrap().ends_with('Z'), "{w}");
    assert!(w["pid"].as_u64().unwrap() > 0, "{w}");
    assert!(!w["ip_address"].as_str().unwrap().is_empty(), "{w}");

    // Awaited workers that fail: the document, exit status 1, and nothing on stderr.
    let r = berth(&d, &["--json", "await", "--timeout", "1", &id]).await;
    assert_eq!((r.code, r.stderr.as_str()), (1, ""), "{r:?}");
    assert_eq!(r.json()["failures"][0]["id"], id.as_str());

    // Stopped by a signal: the signal is set, the exit code null.
    let v = berth(&d, &["--json", "stop", "--grace", "0", &id])
        .await
        .ok()
        .json();
    assert_worker_document(&v["workers"][0]);
    let r = berth(&d, &["--json", "await", "--timeout", &t, &id]).await;
    let w = &r.json()["failures"][0];
    assert_worker_document(w);
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{w}");
    assert_eq!(w["exit_code"], Value::Null, "{w}");
    assert!(w["signal"].is_number(), "{w}");
    assert!(w["finished_at"].is_string(), "{w}");

    // Failures: one JSON document on stderr, the code by its gRPC name, the server's message.
    let cases: &[(&[&str], i32, &str, &str)] = &[
        (
            &["launch", "--cpu", "0", "--", "/bin/true"],
            1,
            "INVALID_ARGUMENT",
            "cpu",
        ),
        (
            &["launch", "-n", "0", "--", "/bin/true"],
            1,
            "INVALID_ARGUMENT",
            "n",
        ),
        (
            &["launch", "--cpu", "100000", "--", "/bin/true"],
            1,
            "RESOURCE_EXHAUSTED",
            "cpu",
        ),
        (&["list", "nosuchworker7"], 1, "NOT_FOUND", "nosuchworker7"),
        (&["stop", "nosuchworker7"], 1, "NOT_FOUND", "nosuchworker7"),
        (
            &["session", "keepalive", "nosuchsession7"],
            1,
            "NOT_FOUND",
            "nosuchsession7",
        ),
        // Usage errors too (exit status 2), with clap's first line.
        (&["launch", "--count", "x"], 2, "INVALID_ARGUMENT", "'x'"),
        (&["stop"], 2, "INVALID_ARGUMENT", "required"),
    ];
    for (args, status, code, needle) in cases {
        let r = berth(&d, &[&["--json"][..], args].concat()).await;
        assert_eq!(r.code, *status, "{args:?}: {r:?}");
        let (c, m) = error_document(&r);
        assert_eq!(c, *code, "{args:?}: {r:?}");
        assert!(m.contains(needle), "{args:?}: {m}");
        assert!(!m.starts_with(code), "the code is not repeated: {m}");
    }
    let gone = d.dir.join("nobody.sock");
    let r = berth(
        &d,
        &[
            "--json",
            "--addr",
            &format!("unix:{}", gone.display()),
            "list",
        ],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    let (c, m) = error_document(&r);
    assert_eq!(c, "UNAVAILABLE");
    assert!(m.contains("nobody.sock"), "{m}");
    // Help is no error, even with --json.
    let r = berth(&d, &["--json", "session", "--help"]).await;
    assert!(r.ok().stdout().contains("open"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_open_keepalive_close() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let v = berth(
        &d,
        &["--json", "session", "open", "--ttl", "60", "-l", "a=b"],
    )
    .await
    .ok()
    .json();
    for (field, ty) in [
        ("id", "string"),
        ("ttl_seconds", "number"),
        ("expires_at", "string"),
        ("created_at", "string"),
        ("labels", "object"),
        ("owner", "string"),
        ("holder_pid", "null"),
    ] {
        assert_eq!(json_type(&v[field]), ty, "{field}: {v}");
    }
    assert_eq!(v["ttl_seconds"], 60);
    assert_eq!(v["labels"]["a"], "b");
    let s = v["id"].as_str().unwrap().to_owned();
    // Without --json: the id alone, for S=$(berth session open).
    let plain = berth(&d, &["session", "open"]).await.ok().stdout();
    assert_eq!(plain.trim_end().len(), plain.len() - 1, "{plain:?}");
    assert!(!plain.trim().contains(char::is_whitespace), "{plain:?}");

    let ids = launch(&d, &["-n", "2", "--session", &s, "--", "sleep", "1000"]).await;
    let v = berth(&d, &["--json", "session", "keep-alive", &s])
        .await
        .ok()
        .json();
    assert_eq!(v["id"], s.as_str());
    assert!(v["expires_at"].is_string(), "{v}");
    let v = berth(&d, &["--json", "session", "close", "--grace", "0", &s])
        .await
        .ok()
        .json();
    let mut stopped = ids_of(&serde_json::json!({"workers": v["stopped"]}));
    stopped.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(stopped, want, "{v}");
    for w in v["stopped"].as_array().unwrap() {
        assert_worker_document(w);
    }
    let r = berth(&d, &["--json", "list", "--session", &s]).await;
    for w in r.ok().json()["workers"].as_array().unwrap() {
        assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{w}");
        assert_eq!(w["reason"], "session ended", "{w}");
    }
    // Ended: it renews no more.
    let r = berth(&d, &["session", "keepalive", &s]).await;
    assert!(
        r.code == 1 && r.stderr.starts_with("berth: NOT_FOUND: "),
        "{r:?}"
    );
    let r = berth(&d, &["session", "open", "--output", "/tmp/x"]).await;
    assert_eq!(r.code, 2, "--output needs --hold-while: {r:?}");
}

/// A process for a holder to hold, killed when dropped.
struct Held(std::process::Child);

impl Held {
    fn start() -> Self {
        Held(
            Command::new("sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .spawn()
                .expect("run sleep"),
        )
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(") ")?.1.chars().next()?;
            Some(!matches!(state, 'Z' | 'X'))
        })
        .unwrap_or(false)
}

/// Waits until `f` holds, for at most `limit` (scaled); says what it waited for otherwise.
async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + scaled(limit);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session held while `held` lives, its output to `out` (and stderr lines to `err`).
async fn open_held(d: &Daemon, held: &Held, ttl: u64, out: &Path, err: Option<&Path>) -> Value {
    let (ttl, pid) = (ttl.to_string(), held.pid());
    let out = out.display().to_string();
    let mut args = vec![
        "--json",
        "session",
        "open",
        "--ttl",
        &ttl,
        "--hold-while",
        &pid,
        "--output",
        &out,
    ];
    let err = err.map(|p| p.display().to_string());
    if let Some(e) = &err {
        args.extend(["--output-stderr", e]);
    }
    // berth_in reads berth's stdout to its end: a holder that kept the pipe would hang here.
    berth(d, &args).await.ok().json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_copies_output_and_ends_with_its_process() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let mut held = Held::start();
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let ttl = scaled(Duration::from_secs(2)).as_secs();
    // A descriptor that berth inherits (as it would inherit a listening socket of R's).
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let inherited = std::fs::read_link(format!("/proc/self/fd/{}", pipe[1])).unwrap();
    let v = open_held(&d, &held, ttl, &out, Some(&err)).await;
    for fd in pipe {
        // SAFETY: close(2) of the descriptors made above, used by nothing else.
        unsafe { libc::close(fd) };
    }
    let s = v["id"].as_str().unwrap().to_owned();
    let holder = v["holder_pid"].as_u64().expect("a holder pid");
    assert!(running(holder), "{v}");
    // Detached: standard streams on /dev/null, nothing inherited.
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{holder}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    // Closed as the holder starts (which may be a moment after `session open` returned).
    wait_for(
        "close of the inherited descriptor",
        Duration::from_secs(5),
        || {
            std::fs::read_dir(format!("/proc/{holder}/fd"))
                .unwrap()
                .all(|e| std::fs::read_link(e.unwrap().path()).unwrap_or_default() != inherited)
        },
    )
    .await;
    let stat = std::fs::read_to_string(format!("/proc/{holder}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[2], holder.to_string(), "a process group of its own");

    let code = "printf 'one\\ntwo\\n'; echo oops >&2; printf partial";
    let first = launch(
        &d,
        &["-n", "2", "--session", &s, "--", "/bin/sh", "-c", code],
    )
    .await;
    // Past a few leases: the holder renews; and a worker launched later is followed too.
    tokio::time::sleep(Duration::from_secs(2 * ttl)).await;
    let later = launch(&d, &["--session", &s, "--", "/bin/sh", "-c", code]).await;
    let sleeper = launch(&d, &["--session", &s, "--", "sleep", "1000"]).await;
    let all: Vec<&String> = first.iter().chain(&later).collect();
    wait_for("output of every worker", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        all.iter()
            .all(|id| text.contains(&format!("[{id}] partial\n")))
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    let errs = std::fs::read_to_string(&err).unwrap();
    for id in &all {
        let of: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("[{id}] ")))
            .collect();
        assert_eq!(of, ["one", "two", "partial"], "{text}");
        assert!(errs.contains(&format!("[{id}] oops\n")), "{errs}");
    }
    assert!(!text.contains("oops"), "{text}");
    let w = berth(&d, &["--json", "list", &sleeper[0]])
        .await
        .ok()
        .json();
    assert_eq!(w["workers"][0]["status"], "WORKER_STATUS_RUNNING", "{w}");

    // The held process ends (kill -9): the session is closed at once, not at the lease's end.
    held.kill();
    let killed = std::time::Instant::now();
    let r = berth(&d, &["--json", "await", "--timeout", "60", &sleeper[0]]).await;
    let took = killed.elapsed();
    let w = &r.json()["failures"][0];
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{r:?}");
    assert_eq!(w["reason"], "session ended", "{w}");
    assert!(
        took < scaled(Duration::from_secs(2)),
        "stopped {took:?} after its process ended"
    );
    wait_for("end of the holder", Duration::from_secs(10), || {
        !running(holder)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_ends_without_its_holder_and_its_holder_without_it() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let held = Held::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ttl = scaled(Duration::from_secs(2)).as_secs();

    // The holder killed: the lease lapses.
    let v = open_held(&d, &held, ttl, &out, None).await;
    let (s, holder) = (v["id"].as_str().unwrap(), v["holder_pid"].as_u64().unwrap());
    let id = launch(&d, &["--session", s, "--", "sleep", "1000"]).await;
    // SAFETY: kill(2) of the holder this test started (through berth), which is running.
    unsafe { libc::kill(holder as i32, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    let r = berth(&d, &["--json", "await", "--timeout", "60", &id[0]]).await;
    let w = &r.json()["failures"][0];
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED", "{r:?}");
    assert_eq!(w["reason"], "session ended", "{w}");
    assert!(
        killed.elapsed() < Duration::from_secs(ttl) + scaled(Duration::from_secs(4)),
        "stopped {:?} after its holder was killed",
        killed.elapsed()
    );

    // The session closed by someone: the holder exits, its process lives on.
    let v = open_held(&d, &held, ttl, &out, None).await;
    let (s, holder) = (v["id"].as_str().unwrap(), v["holder_pid"].as_u64().unwrap());
    berth(&d, &["session", "close", s]).await.ok();
    wait_for("end of the holder", Duration::from_secs(ttl + 5), || {
        !running(holder)
    })
    .await;
    assert!(running(u64::from(held.0.id())));

    // A process that does not exist is refused before a session is opened.
    let r = berth(
        &d,
        &["--json", "session", "open", "--hold-while", "999999999"],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    let (code, m) = error_document(&r);
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(m.contains("999999999"), "{m}");
}
