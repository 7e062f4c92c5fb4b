//! What both daemons tell systemd (`Type=notify`), through the sd-notify crate: readiness once
//! they serve, a `STATUS=` line, stopping, and the watchdog. Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.
//!
//! The watchdog pings only while the daemon really serves: the ping task runs on the same
//! runtime as the gRPC servers (a wedged runtime sends nothing), and before each ping it asks
//! `alive` — for berthd, a read of the supervisor's state on a blocking thread — which must answer
//! within half the watchdog interval (a deadlocked supervisor or an exhausted blocking pool sends
//! nothing either). systemd then kills and restarts the daemon (`WatchdogSec=`, `Restart=always`);
//! workers live on under their shims and are re-adopted.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A `STATUS=` line.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Sends `WATCHDOG=1` every half of `WATCHDOG_USEC` (when systemd asks for a watchdog) while
/// `alive` answers true within that half, until `shutdown`.
pub fn spawn_watchdog<F, Fut>(alive: F, shutdown: CancellationToken)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog on"
    );
    crate::spawn_in(tracing::info_span!("watchdog"), async move {
        let mut tick = tokio::time::interval(half);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            match tokio::time::timeout(half, alive()).await {
                Ok(true) => {
                    if failing {
                        tracing::info!("serving again: watchdog pings resume");
                        failing = false;
                    }
                    notify(&[NotifyState::Watchdog]);
                }
                Ok(false) | Err(_) => {
                    if !failing {
                        tracing::error!("not serving: watchdog pings withheld");
                        failing = true;
                    }
                }
            }
        }
    });
}

/// A test hook (only with `BERTH_TEST_WEDGE_ON_SIGUSR2=1` in the environment): at SIGUSR2, every
/// runtime worker thread is blocked for good, as a deadlock would leave them, so that tests can
/// see the watchdog stop.
pub fn install_wedge_hook() {
    if std::env::var_os("BERTH_TEST_WEDGE_ON_SIGUSR2").is_none() {
        return;
    }
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
            return;
        };
        usr2.recv().await;
        tracing::warn!("test hook: wedging the runtime");
        for _ in 0..64 {
            tokio::spawn(async {
                // Blocks the worker thread it lands on, never yielding: the point of the hook.
                std::thread::sleep(Duration::from_secs(3600));
            });
        }
    });
}
