//! End-to-end tests of the host daemon core: real berthd, real workers, real cgroups, real gRPC.

use berth_tests::{command_request, pb, require_root, Daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_and_await_a_command() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let r = c
        .workers()
        .launch_workers(command_request(2, &["/bin/sh", "-c", "echo hello"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.workers.len(), 2);
    let ids: Vec<String> = r.workers.iter().map(|w| w.id.clone()).collect();
    let all = berth_tests::await_all(&c, &ids).await.unwrap();
    for w in &all {
        assert_eq!(w.status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
    }
    let out = berth_tests::output_of(&c, &ids[0], pb::Stream::Stdout)
        .await
        .unwrap();
    assert_eq!(out, b"hello\n");
}
