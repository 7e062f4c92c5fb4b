//! berth's host daemon as a library: `core` (pure logic), `sys` (every effect on the host) and
//! `services` (the supervisor and its gRPC servers). The binaries are thin wrappers.

pub mod config;
pub mod core;
pub mod error;
pub mod services;
pub mod sys;

/// Version reported in `HostInfo` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
