//! End-to-end tests of berthd under load: output followers are woken by the shim's writes (a
//! line reaches them within milliseconds, and a thousand idle ones cost the daemon no CPU), and
//! the load limits of `[load]` hold on a real daemon (a busy daemon refuses short calls at
//! once while a lease still renews).
//!
//! The timing tests run one at a time (a lock), in a test binary of their own, so that the
//! other suites do not compete with them for the cores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_tests::{
    await_running, command_request, launch, open_session, pb, python_request, require_root, scaled,
    timeout_scale, Daemon, DaemonOptions,
};
use tokio::sync::Mutex;
use tonic::Code;

/// Held by each test: the measurements want the machine to themselves.
static ALONE: Mutex<()> = Mutex::const_new(());

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A worker writes a line every 200 ms, each holding the time it was written; a follower
/// measures how long each took to reach it. Polling every 10–100 ms put the median near 50 ms
/// (a line 200 ms after the last waited for the poll after it); woken by the write, it is well
/// under a millisecond on an idle machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_a_line_within_milliseconds() {
    require_root!();
    let _alone = ALONE.lock().await;
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let code = "import time\n\
        for i in range(35):\n\
        \x20   time.sleep(0.2)\n\
        \x20   print('%.6f' % time.time(), flush=True)\n";
    let w = launch(&c, python_request(1, code)).await.remove(0);
    let mut s = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![w.id.clone()],
            follow: true,
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut delays = Vec::new();
    let mut pending = String::new();
    let all = async {
        while let Some(ch) = s.message().await.unwrap() {
            let at = now_secs();
            pending.push_str(&String::from_utf8_lossy(&ch.data));
            while let Some(nl) = pending.find('\n') {
                let line: String = pending.drain(..=nl).collect();
                let written: f64 = line.trim().parse().unwrap();
                delays.push((at - written) * 1000.0);
            }
        }
    };
    tokio::time::timeout(scaled(Duration::from_secs(60)), all)
        .await
        .expect("the follow did not end with the worker");
    assert_eq!(delays.len(), 35, "every line arrived, once");
    // The first lines come while the interpreter and the follow start.
    let mut steady: Vec<f64> = delays[5..].to_vec();
    steady.sort_by(f64::total_cmp);
    let (median, p90) = (percentile(&steady, 0.5), percentile(&steady, 0.9));
    eprintln!("line delay: median {median:.2} ms, p90 {p90:.2} ms, all {steady:.2?}");
    // Polling woke every 10-100 ms, a timer: its median was ~50 ms on any machine. Under
    // emulation (the v2 tier's guest runs ~6x slower) a woken follower takes ~20 ms, so there
    // the bound is 40 ms, still below what polling gave.
    let bound = if timeout_scale() > 1.0 { 40.0 } else { 10.0 };
    assert!(
        median < bound,
        "median line delay {median:.2} ms, over {bound} ms (polling gave ~50 ms): {steady:.2?}"
    );
}

/// A thousand followers of a sleeping worker cost berthd nothing while nothing is written:
/// under 2 % of a core over 10 s (polling cost that many followers tens of percent). Then the
/// worker ends and every follow ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_followers_cost_no_cpu() {
    require_root!();
    let _alone = ALONE.lock().await;
    let d = Daemon::start().await.unwrap();
    let pid = d.pid().unwrap();
    let c = d.client().await.unwrap();
    let w = launch(
        &c,
        command_request(1, &["/bin/sh", "-c", "echo ready; exec sleep 600"]),
    )
    .await
    .remove(0);
    await_running(&c, std::slice::from_ref(&w.id)).await;
    // Two connections of 500 streams each (a connection carries up to 1024).
    let channels = [d.client().await.unwrap(), d.client().await.unwrap()];
    let seen = Arc::new(AtomicUsize::new(0));
    let mut followers = Vec::new();
    for i in 0..1000 {
        let mut s = channels[i % 2]
            .workers()
            .stream_output(pb::StreamOutputRequest {
                ids: vec![w.id.clone()],
                follow: true,
                from_start: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let seen = seen.clone();
        followers.push(tokio::spawn(async move {
            let first = s.message().await.unwrap().expect("the first line");
            assert_eq!(first.data, b"ready\n");
            seen.fetch_add(1, Ordering::SeqCst);
            let mut more = 0;
            while s.message().await.unwrap().is_some() {
                more += 1;
            }
            more
        }));
    }
    let t = Instant::now();
    while seen.load(Ordering::SeqCst) < 1000 {
        assert!(
            t.elapsed() < scaled(Duration::from_secs(60)),
            "{} of 1000 followers got the first line",
            seen.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu1, took) = (cpu_seconds(pid), t0.elapsed());
    let percent = (cpu1 - cpu0) / took.as_secs_f64() * 100.0;
    eprintln!("berthd CPU with 1000 idle followers: {percent:.2} % over {took:.1?}");
    assert!(
        percent < 2.0,
        "1000 idle followers cost berthd {percent:.2} % of a core"
    );

    // The worker ends: every follow ends, promptly, having seen nothing more.
    let t = Instant::now();
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: vec![w.id.clone()],
            grace_seconds: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    for f in followers {
        let more = tokio::time::timeout(scaled(Duration::from_secs(10)), f)
            .await
            .expect("a follow did not end with its worker")
            .unwrap();
        assert_eq!(more, 0);
    }
    eprintln!("1000 follows ended {:?} after the stop", t.elapsed());
}

/// `[load]` on a real daemon: with one short call allowed at a time, a stop that waits out
/// its grace period holds the slot; meanwhile short calls are refused at once, and the session's
/// lease still renews on the same connection beside an await without a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_daemon_refuses_short_calls_at_once_and_leases_renew() {
    require_root!();
    let _alone = ALONE.lock().await;
    let d = Daemon::start_with(DaemonOptions {
        config: "[load]\nmax_concurrent_requests = 1\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let session = open_session(&c, 30).await;
    let mut req = command_request(
        1,
        &[
            "/bin/sh",
            "-c",
            "trap 'echo term' TERM; echo up; while :; do sleep 0.05; done",
        ],
    );
    req.session_id = session.id.clone();
    let w = launch(&c, req).await.remove(0);
    await_running(&c, std::slice::from_ref(&w.id)).await;
    // Wait for the trap to be set (the first line comes after it).
    let t = Instant::now();
    while berth_tests::stdout_now(&c, &w.id).await.is_empty() {
        assert!(t.elapsed() < scaled(Duration::from_secs(10)), "no output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut aw = c.workers();
    let ids = vec![w.id.clone()];
    let awaiting = tokio::spawn(async move {
        aw.await_workers(pb::AwaitWorkersRequest {
            ids,
            timeout_seconds: Some(0),
            ..Default::default()
        })
        .await
    });
    // The worker ignores SIGTERM: the stop waits out its 4 s grace, then kills, and holds the
    // only slot meanwhile.
    let mut st = c.workers();
    let id = w.id.clone();
    let stopping = tokio::spawn(async move {
        st.stop_workers(pb::StopWorkersRequest {
            ids: vec![id],
            grace_seconds: Some(4),
            ..Default::default()
        })
        .await
    });
    // The worker says when the stop's SIGTERM reached it: from then until its grace ends, the
    // stop holds the only slot. (Probing earlier could take the slot from the stop itself.)
    let t = Instant::now();
    while !String::from_utf8_lossy(&berth_tests::stdout_now(&c, &w.id).await).contains("term") {
        assert!(
            t.elapsed() < scaled(Duration::from_secs(3)),
            "the stop's SIGTERM did not reach the worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t1 = Instant::now();
    let r = c
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await;
    let refused = t1.elapsed();
    assert_eq!(
        r.err().map(|e| e.code()),
        Some(Code::ResourceExhausted),
        "a short call while the stop held the only slot"
    );
    assert!(
        refused < Duration::from_millis(500),
        "refused after {refused:?}"
    );
    let t1 = Instant::now();
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: session.id.clone(),
        })
        .await
        .expect("the lease renews while the daemon is busy");
    assert!(t1.elapsed() < Duration::from_secs(1));
    assert!(
        !stopping.is_finished(),
        "the stop still waits out its grace"
    );
    let stopped = stopping.await.unwrap().expect("the stop completes");
    assert_eq!(stopped.into_inner().workers.len(), 1);
    let awaited = awaiting.await.unwrap().unwrap().into_inner();
    assert_eq!(awaited.failures.len(), 1, "a stopped worker is a failure");
    c.workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .expect("short calls run again once the slot is free");
}
