//! What berthd tells systemd, seen by a test `NOTIFY_SOCKET` listener: `READY=1` with a status
//! once it serves, `WATCHDOG=1` every half `WATCHDOG_USEC` while it really serves, none once its
//! runtime is wedged (a test hook), and `STOPPING=1` at SIGTERM.

use std::time::{Duration, Instant};

use berth_tests::{is_root, scaled, Daemon, DaemonOptions};
use tokio::net::UnixDatagram;

/// The messages that reach `sock` within `within`.
async fn messages(sock: &UnixDatagram, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match tokio::time::timeout(left, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => return out,
        }
    }
}

fn count(msgs: &[String], what: &str) -> usize {
    msgs.iter().filter(|m| m.lines().any(|l| l == what)).count()
}

#[tokio::test]
async fn readiness_watchdog_pings_and_their_end_when_the_runtime_is_wedged() {
    if !is_root() {
        eprintln!("skipped: needs root (cgroups, network namespaces)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let env = |hook: bool| {
        let mut e = vec![
            ("NOTIFY_SOCKET".to_owned(), path.display().to_string()),
            ("WATCHDOG_USEC".to_owned(), "300000".to_owned()),
        ];
        if hook {
            e.push(("BERTH_TEST_WEDGE_ON_SIGUSR2".to_owned(), "1".to_owned()));
        }
        e
    };

    // Ready once serving (start_with returns when gRPC answers), then pings every ~150 ms.
    let mut d = Daemon::start_with(DaemonOptions {
        env: env(false),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = messages(&sock, scaled(Duration::from_millis(1500))).await;
    let ready = first
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {first:?}"));
    assert!(ready.contains("STATUS=serving"), "{ready:?}");
    assert!(count(&first, "WATCHDOG=1") >= 3, "{first:?}");
    // SIGTERM: STOPPING=1, and the pings end with the daemon.
    d.stop_daemon(libc::SIGTERM);
    let last = messages(&sock, Duration::from_millis(500)).await;
    assert!(count(&last, "STOPPING=1") == 1, "{last:?}");
    drop(d);
    while !messages(&sock, Duration::from_millis(100)).await.is_empty() {}

    // A wedged runtime sends no more pings: systemd's watchdog then restarts the daemon.
    let mut d = Daemon::start_with(DaemonOptions {
        env: env(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = messages(&sock, Duration::from_millis(1000)).await;
    assert!(count(&before, "WATCHDOG=1") >= 3, "{before:?}");
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGUSR2) };
    // What was under way when the hook struck may still arrive.
    messages(&sock, Duration::from_millis(400)).await;
    let wedged = messages(&sock, Duration::from_millis(1500)).await;
    assert_eq!(count(&wedged, "WATCHDOG=1"), 0, "{wedged:?}\n{}", d.log());
    // It cannot answer SIGTERM any more either: only SIGKILL ends it, as systemd's would.
    d.stop_daemon(libc::SIGKILL);
}
