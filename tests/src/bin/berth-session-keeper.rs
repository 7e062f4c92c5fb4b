//! A minimal session client for tests: renews session ARG2 on server ARG1 every 500 ms until
//! killed — the part of a notebook client that a crash takes away.

use berth_tests::{pb, Client};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(session)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: berth-session-keeper ADDR SESSION_ID");
    };
    let c = Client::connect(&addr).await?;
    loop {
        c.workers()
            .keep_alive(pb::KeepAliveRequest {
                session_id: session.clone(),
            })
            .await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
