//! berthd, the berth host daemon, as a library: the supervisor ([`supervisor`]) that admits,
//! starts, follows and stops the host's workers; its face as a
//! [`WorkersBackend`](berth_server::workers::WorkersBackend) ([`backend`]); `berth.v1.Host`
//! ([`info`]); heartbeats to a scheduler ([`member`]); its metrics; its configuration; and the
//! assembly of the daemon from all of it ([`daemon`]). The binaries are thin wrappers.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod info;
pub mod member;
pub mod metrics;
pub mod peers;
pub mod phase;
pub mod supervisor;
