//! A retried launch: the same caller's `request_id` within ten minutes gets the first launch's
//! workers back, also from a daemon killed with SIGKILL and started again in between, and starts
//! nothing; a retry that asks for another count, or an id past its limits, is refused naming
//! `request_id`.

use std::collections::BTreeSet;

use berth_tests::{command_request, ids_of, launch, pb, require_root, Client, Daemon};
use tonic::Code;

async fn all_ids(c: &Client) -> BTreeSet<String> {
    berth_tests::list_all(c)
        .await
        .into_iter()
        .map(|w| w.id)
        .collect()
}

fn sleeper(n: u32, request_id: &str) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        request_id: request_id.into(),
        ..command_request(n, &["/bin/sleep", "60"])
    }
}

async fn refused_naming_request_id(c: &Client, req: pb::LaunchWorkersRequest) {
    match c.workers().launch_workers(req).await {
        Ok(r) => panic!("launch admitted: {:?}", ids_of(&r.into_inner().workers)),
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert!(s.message().starts_with("request_id: "), "{s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_launch_gets_its_first_workers_across_a_crash() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let first = ids_of(&launch(&c, sleeper(2, "retry-1")).await);
    // Retries racing each other and a plain launch beside them.
    let (a, b) = tokio::join!(
        launch(&c, sleeper(2, "retry-1")),
        launch(&c, sleeper(2, "retry-1"))
    );
    assert_eq!(ids_of(&a), first, "the first launch's workers, in order");
    assert_eq!(ids_of(&b), first);
    let other = ids_of(&launch(&c, sleeper(1, "")).await);
    let mut expected: BTreeSet<String> = first.iter().cloned().collect();
    expected.extend(other.iter().cloned());
    assert_eq!(all_ids(&c).await, expected, "nothing else launched");

    refused_naming_request_id(&c, sleeper(3, "retry-1")).await;
    refused_naming_request_id(&c, sleeper(1, &"x".repeat(129))).await;
    refused_naming_request_id(&c, sleeper(1, "a\u{7}b")).await;
    assert_eq!(all_ids(&c).await, expected, "a refusal makes nothing");

    // The id is kept with the workers' records: after a crash the retry is still a retry.
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let again = launch(&c, sleeper(2, "retry-1")).await;
    assert_eq!(ids_of(&again), first);
    assert!(
        again
            .iter()
            .all(|w| w.status == pb::WorkerStatus::Running as i32),
        "{again:?}"
    );
    assert_eq!(all_ids(&c).await, expected);
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
}
